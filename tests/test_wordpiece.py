"""BERT WordPiece tokenizers (llm_jax.data.wordpiece): the ids of transformers' BertTokenizerFast, special tokens
typed in a prompt, the byte table bits per byte count, and compress's refusal of text it cannot give back."""
import json
import os
from pathlib import Path

import numpy as np
import pytest

from llm_jax.data.pieces import PieceTable
from llm_jax.data.tokenizer import Tokenizer, from_bytes
from llm_jax.data.wordpiece import WordPieceTokenizer, piece_bytes
from llm_jax.errors import DataError

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["今", "天", "气", "真", "好", "的", "很", "，", "。", "！", "我", "们", "是", "年", "你", "吗", "hello", "world",
         "the", "quick", "fox", "jump", "##s", "##ing", "20", "##19", "3", ".", "14", ",", "!", "?", "x", "=", "a"]
MIXED = ["今天天气真好，我们是2019年的！", "hello world, the quick fox jumps!", "x = 3.14 今天 hello你好吗？",
         "jumping   the\tfox\n\n今天", "unknownword 今天", "[CLS] typed [SEP] 今天", ""]


def write_vocab(folder: Path, lower: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(SPECIALS + WORDS) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": lower, "tokenize_chinese_chars": True}))
    return folder / "vocab.txt"


@pytest.fixture
def tok(tmp_path) -> WordPieceTokenizer:
    return Tokenizer.load(write_vocab(tmp_path / "bert"))


def test_ids_equal_transformers_bert_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    for lower in (False, True):
        folder = tmp_path / f"lower{lower}"
        tok = Tokenizer.load(write_vocab(folder, lower))
        hf = transformers.BertTokenizerFast.from_pretrained(folder)
        for text in MIXED + ["HELLO World", "Ｈｅｌｌｏ　全角"]:  # transformers parses specials, as encode_prompt
            want = hf(text, add_special_tokens=False)["input_ids"]
            assert tok.encode_prompt(text) == want, (lower, text)
            if "[CLS]" not in text:  # encode() keeps typed specials as text; elsewhere it is the same
                assert tok.encode(text) == want, (lower, text)


def test_special_tokens_become_ids_in_a_prompt_only(tok):
    cls, sep = tok.specials["[CLS]"], tok.specials["[SEP]"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (cls, sep, 0, 1) == (2, 3, 0, 1)
    assert tok.encode_prompt("[CLS]今天天气真") == [cls, *tok.encode("今天天气真")]
    assert tok.encode_prompt("今天[SEP]好[SEP]") == [*tok.encode("今天"), sep, *tok.encode("好"), sep]
    assert not {cls, sep} & set(tok.encode("[CLS]今天[SEP]"))  # typed in content, they stay text


def test_bytes_drop_cjk_spaces_and_keep_word_spaces(tok):
    assert piece_bytes("##ing") == b"ing" and piece_bytes("hello") == b" hello" and piece_bytes("今") == "今".encode()
    assert piece_bytes("，") == "，".encode() and piece_bytes("20") == b" 20"
    chinese = "今天天气真好，我们是年的！"
    ids = tok.encode(chinese)
    assert tok.decode(ids) == chinese and tok.scored_bytes(chinese) == chinese.encode()
    assert int(tok.byte_lengths()[ids].sum()) == len(chinese.encode())
    assert tok.decode(tok.encode("hello world, the quick fox jumps!")) == " hello world, the quick fox jumps!"
    assert tok.decode(tok.encode("jumping   the\tfox")) == " jumping the fox"  # whitespace is not kept
    assert tok.decode(tok.encode("unknownword 今天")) == "今天"  # [UNK] is no bytes
    for text in MIXED:  # what bits per byte divide by is what the tokens decode to
        assert tok.scored_bytes(text) == tok.decode_bytes(tok.encode(text))
        assert int(tok.byte_lengths()[tok.encode(text)].sum()) == len(tok.scored_bytes(text))
    assert not tok.lossless and all(tok.byte_lengths()[list(tok.specials.values())] == 0)


def test_serialized_form_round_trips_and_pickles(tok, tmp_path):
    import pickle
    again = from_bytes(tok.serialized())
    assert isinstance(again, WordPieceTokenizer) and again.sha256 == tok.sha256
    (tmp_path / "tokenizer.model").write_bytes(tok.serialized())  # as an export keeps it
    assert Tokenizer.load(tmp_path / "tokenizer.model").encode(MIXED[2]) == tok.encode(MIXED[2])
    assert pickle.loads(pickle.dumps(tok)).encode(MIXED[0]) == tok.encode(MIXED[0])


def test_bad_vocabularies_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="vocab.txt does not exist"):
        Tokenizer.load(tmp_path / "vocab.txt")
    (tmp_path / "vocab.txt").write_text("a\nb\n")
    with pytest.raises(DataError, match=r"unknown token '\[UNK\]' is not in the vocabulary"):
        Tokenizer.load(tmp_path / "vocab.txt")
    write_vocab(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_basic_tokenize": False}))
    with pytest.raises(DataError, match="do_basic_tokenize=false"):
        Tokenizer.load(tmp_path / "vocab.txt")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"sep_token": "</s>"}))
    with pytest.raises(DataError, match="special tokens other than BERT's are not supported .sep_token='</s>'"):
        Tokenizer.load(tmp_path / "vocab.txt")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable"):
        Tokenizer.load(tmp_path / "vocab.txt")
    (tmp_path / "vocab.txt").write_bytes(b"\xff\xfe[UNK]\n")
    with pytest.raises(DataError, match="unreadable"):
        Tokenizer.load(tmp_path / "vocab.txt")


def test_compress_refuses_text_the_tokenizer_cannot_give_back(tok):
    from llm_jax.inference.codec import to_tokens
    chinese = "今天天气真好，我们是年的！".encode()
    assert tok.decode_bytes(to_tokens(chinese, tok)) == chinese
    for text, at in (("今天 天气", 6), ("hello world", 0), ("今天unknownword", 6)):
        with pytest.raises(DataError, match=f"cannot reproduce the input.*byte {at}") as e:
            to_tokens(text.encode(), tok)
        assert "\n" not in str(e.value)


def shared_vocab() -> Path:
    root = Path(os.environ.get("LLM_JAX_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
    return root / "zh_gpt2_chinese_demo" / "vocab.txt"


@pytest.mark.skipif(not shared_vocab().is_file(), reason="the Chinese GPT-2 demo's vocab.txt is not in the shared "
                    "data folder ($LLM_JAX_DATA or ../shared/data)")
def test_the_chinese_gpt2_demo_facts_hold_on_its_real_vocabulary():
    """The facts of ../shared/data/zh_gpt2_chinese_demo/README.md, on its byte-exact vocab.txt."""
    tok = Tokenizer.load(shared_vocab())
    assert tok.vocab_size == 21128
    assert {k: tok.specials[k] for k in SPECIALS} == {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102,
                                                      "[MASK]": 103}
    assert tok.encode_prompt("[CLS]今天天气真") == [101, 791, 1921, 1921, 3698, 4696]
    sentence = "的很好，我们一行人去吃的，点了一个牛肉锅"
    assert tok.encode(sentence) == [4638, 2523, 1962, 8024, 2769, 812, 671, 6121, 782, 1343, 1391, 4638, 8024, 4157,
                                    749, 671, 702, 4281, 5489, 7222]
    assert tok.decode(tok.encode(sentence)) == sentence and tok.scored_bytes(sentence) == sentence.encode()


def test_every_tokenizer_kind_parses_its_specials_in_a_prompt(tmp_path):
    """encode_prompt is PieceTable's: one implementation over each tokenizer's `specials`."""
    class Chars(PieceTable):  # one piece per character of a tiny alphabet, plus two specials
        def __init__(self):
            super().__init__(b"chars", [b"", b""] + [c.encode() for c in "ab<>|"])

        specials = {"<a>": 0, "<|b|>": 1}
        encode_batch = staticmethod(lambda texts: [["ab<>|".index(c) + 2 for c in t] for t in texts])

    chars = Chars()
    assert chars.encode_prompt("a<a>b<|b|><|b") == [2, 0, 3, 1, 4, 6, 3]
    assert chars.encode_prompt("") == [] and chars.encode_prompt("<a><a>") == [0, 0]
    assert np.array_equal(chars.byte_lengths(), [0, 0, 1, 1, 1, 1, 1])


@pytest.mark.slow
def test_a_chinese_gpt2_imports_with_its_vocabulary_and_exports_back(tmp_path):
    """config.json (tokenizer_class BertTokenizer) + pytorch_model.bin + vocab.txt, as the classic demo downloads
    them: the export has the WordPiece tokenizer and records the sep template; export-hf gives transformers the
    same model and a BertTokenizer with the same ids."""
    transformers = pytest.importorskip("transformers", reason="needs the [hf] extra")
    torch = pytest.importorskip("torch", reason="needs the [hf] extra")
    from llm_jax.interop.hf import export_hf, import_hf
    from llm_jax.train.export import load_for_inference
    from tests.test_hf import hf_logits, jax_logits, save_pickle_weights
    hf_dir = tmp_path / "hf"
    write_vocab(hf_dir)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=len(SPECIALS) + len(WORDS),
                                     n_positions=32, tokenizer_class="BertTokenizer")
    model = transformers.GPT2LMHeadModel(config).eval()
    save_pickle_weights(model, hf_dir)
    cfg = import_hf(hf_dir, tmp_path / "export")
    assert cfg.data.chat_template == "sep"
    cfg, params, tok = load_for_inference(tmp_path / "export")
    assert isinstance(tok, WordPieceTokenizer) and tok.sha256 == Tokenizer.load(hf_dir / "vocab.txt").sha256
    tokens = np.array([tok.encode_prompt("[CLS]今天天气真好")], np.int32)
    np.testing.assert_allclose(jax_logits(cfg, params, tokens), hf_logits(model, tokens), atol=1e-4, rtol=0)
    export_hf(tmp_path / "export", tmp_path / "back")
    back = tmp_path / "back"
    assert (back / "vocab.txt").read_text() == (hf_dir / "vocab.txt").read_text()
    assert json.loads((back / "generation_config.json").read_text())["eos_token_id"] == tok.specials["[SEP]"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(back)
    for text in MIXED:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode_prompt(text)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back).eval()
    np.testing.assert_allclose(hf_logits(reloaded, tokens), hf_logits(model, tokens), atol=1e-5, rtol=0)
