"""Chat templates by name (data.chat_template): sep ([CLS] ... [SEP], the classic Chinese dialogue GPT-2) and
chatml (<|im_start|>role ... <|im_end|>, Qwen's) render a known dialogue to exact ids and loss masks, the
preference and prompt renderings follow them, and a template the tokenizer cannot do is a one-line error."""
import dataclasses
import json

import pytest

from llm_jax.config import Config, DataConfig, validate
from llm_jax.data.chat.dialogue import Message
from llm_jax.data.chat.pairs import Pair
from llm_jax.data.chat.preference import render_pair
from llm_jax.data.chat.template import TEMPLATES, render, render_prompt, show, stop_ids, tags
from llm_jax.data.tokenizer import Tokenizer, train_tokenizer
from llm_jax.errors import ConfigError, DataError
from tests.test_wordpiece import write_vocab

DIALOGUE = [Message("system", "你好"), Message("user", "今天天气"), Message("assistant", "真好"),
            Message("user", "是吗"), Message("assistant", "是的！")]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return Tokenizer.load(write_vocab(tmp_path_factory.mktemp("bert")))


@pytest.fixture(scope="module")
def chatml_bpe(tmp_path_factory):
    """A Qwen-like byte-level BPE tokenizer.json: <|endoftext|>, <|im_start|>, <|im_end|> as added specials."""
    tokenizers = pytest.importorskip("tokenizers", reason="needs the [hf] extra")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["user\nassistant\nsystem\nHello there, how are you? Fine.\n"] * 20, trainer)
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    path.write_text(tok.to_str())
    return Tokenizer.load(path)


def test_sep_renders_cls_turns_and_separators(bert):
    enc = bert.encode
    ids, mask = render(DIALOGUE, bert, template="sep")
    cls, sep = 2, 3
    want = [cls, *enc("你好"), sep, *enc("今天天气"), sep, *enc("真好"), sep, *enc("是吗"), sep, *enc("是的！"), sep]
    assert ids.tolist() == want
    trained = [False] * (1 + 3 + 5) + [True] * 3 + [False] * 3 + [True] * 4
    assert mask.tolist() == trained
    assert show(ids, mask, bert) == "[CLS]你好[SEP]今天天气[SEP]⟦真好[SEP]⟧是吗[SEP]⟦是的！[SEP]⟧"
    prompt = render_prompt(DIALOGUE[:2], bert, "sep")  # the answer follows the [SEP] that closes the question
    assert prompt.tolist() == [cls, *enc("你好"), sep, *enc("今天天气"), sep]
    assert stop_ids(bert, "sep") == {sep}


def test_chatml_renders_roles_and_trains_on_the_answer_and_im_end(chatml_bpe):
    tok, enc = chatml_bpe, chatml_bpe.encode
    start, end = tok.specials["<|im_start|>"], tok.specials["<|im_end|>"]
    dialogue = [Message("system", "Fine."), Message("user", "Hello there"), Message("assistant", "how are you?")]
    ids, mask = render(dialogue, tok, template="chatml")
    nl = enc("\n")
    turns = [([start, *enc("system\n")], enc("Fine.")), ([start, *enc("user\n")], enc("Hello there")),
             ([start, *enc("assistant\n")], enc("how are you?"))]
    assert ids.tolist() == [i for head, body in turns for i in [*head, *body, end, *nl]]
    answer = len(turns[2][1]) + 1
    assert mask.tolist() == [False] * (len(ids) - answer - len(nl)) + [True] * answer + [False] * len(nl)
    assert tok.decode_bytes(ids[mask]) == b"how are you?"  # <|im_end|> is trained on but is no bytes
    assert render_prompt(dialogue[:2], tok, "chatml").tolist()[-1 - len(enc("assistant\n")):] == \
        [start, *enc("assistant\n")]
    assert stop_ids(tok, "chatml") == {end, tok.eos_id}
    assert "<|im_start|>user\nHello there<|im_end|>" in show(ids, mask, tok)
    # typed in a sample prompt, the same tags become their ids
    assert tok.encode_prompt("<|im_start|>user\nHello there<|im_end|>\n") == [start, *enc("user\nHello there"), end, *nl]


def test_content_spelling_a_tag_cannot_forge_a_turn(bert, chatml_bpe):
    ids, mask = render([Message("user", "[SEP]今天"), Message("assistant", "[SEP]")], bert, template="sep")
    assert (ids == 3).sum() == 2 and mask.sum() == len(bert.encode("[SEP]")) + 1
    ids, _ = render([Message("user", "<|im_end|>"), Message("assistant", "x")], chatml_bpe, template="chatml")
    assert (ids == chatml_bpe.specials["<|im_end|>"]).sum() == 2


def test_preference_pairs_end_with_the_templates_end_of_turn(bert):
    pair = Pair(prompt=(Message("user", "今天天气"),), chosen="真好", rejected="是的", margin=1.0)
    chosen, rejected = render_pair(pair, bert, 16, template="sep")
    assert chosen.tolist() == [2, *bert.encode("今天天气"), 3, *bert.encode("真好"), 3]
    assert rejected[-1] == 3 and rejected[:6].tolist() == chosen[:6].tolist()


def test_a_template_the_tokenizer_cannot_do_is_a_config_error(tmp_path, bert):
    own = train_tokenizer(["hello world, a tiny corpus\n" * 50], tmp_path / "own", vocab_size=300)
    for name, missing in (("sep", r"\[CLS\] and \[SEP\]"), ("chatml", r"<\|im_start\|> and <\|im_end\|>")):
        with pytest.raises(ConfigError, match=f"data.chat_template={name} needs the special tokens {missing}") as e:
            render(DIALOGUE, own, template=name)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="chatml"):
        tags(bert, "chatml")
    assert set(TEMPLATES) == {"llm_jax", "sep", "chatml"}
    with pytest.raises(ConfigError, match="data.chat_template='alpaca' is not one of llm_jax, sep, chatml"):
        validate(dataclasses.replace(Config(), data=DataConfig(chat_template="alpaca")))


def test_data_rendered_with_another_template_is_refused(tmp_path):
    from llm_jax.data.chat.prepared import check_template
    cfg = dataclasses.replace(Config(), data=DataConfig(chat_template="sep"))
    check_template({"config": {"chat_template": "sep"}}, cfg, tmp_path)
    for meta, config in (({"config": {}}, cfg), ({"config": {"chat_template": "sep"}}, Config())):
        with pytest.raises(DataError, match="was rendered with chat template (llm_jax|sep), this run's") as e:
            check_template(meta, config, tmp_path)
        assert "\n" not in str(e.value)
    check_template({"config": {}}, dataclasses.replace(Config(), data=DataConfig(chat_template="llm_jax")), tmp_path)


def test_fine_tuning_an_export_keeps_its_template_unless_told(tmp_path):
    from llm_jax.config import to_json
    from llm_jax.experiment import with_init_from
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(to_json(dataclasses.replace(Config(), data=DataConfig(chat_template="sep"))))
    cfg = dataclasses.replace(Config(), checkpoint=dataclasses.replace(Config().checkpoint, init_from=str(export)))
    assert with_init_from(cfg).data.chat_template == "sep"
    chosen = dataclasses.replace(cfg, data=DataConfig(chat_template="chatml"))
    assert with_init_from(chosen).data.chat_template == "chatml"
    assert json.loads((export / "config.json").read_text())["data"]["chat_template"] == "sep"


@pytest.mark.slow
def test_sft_with_the_sep_template_on_a_wordpiece_vocabulary_then_chat(tmp_path, bert, capsys):
    """SFT from scratch on a BERT vocab.txt through the sep template; the export records it, chat uses it, and
    `sample --trace` reads [CLS]/[SEP] typed in the prompt and stops at [SEP] unless --ignore-eos."""
    import io
    from llm_jax.cli.main import main
    from llm_jax.inference.generate import Generator, Sampling
    from llm_jax.inference.runner import ModelRunner
    from llm_jax.inference.stream import chat
    vocab = write_vocab(tmp_path / "bert")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "今天天气"},
                                                      {"role": "assistant", "content": "真好！"}]},
                                        ensure_ascii=False) + "\n" for _ in range(16)))
    common = ["--set", f"data.sources=chat:{chats}", "--set", f"data.tokenizer={vocab}", "--set",
              "data.chat_template=sep", "--set", "model.vocab_size=64", "--set", "data.seq_len=16", "--set",
              "train.steps=40", "--set", "train.eval_every=1000", "--set", "optim.learning_rate=3e-2"]
    assert main(["train", "--config", "sft_tiny", "--run-dir", str(tmp_path / "run"), *common]) == 0
    assert main(["export", "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    cfg, runner, tok = ModelRunner.load(tmp_path / "export")
    assert cfg.data.chat_template == "sep" and tok.sha256 == bert.sha256
    out = io.StringIO()
    dialogue = chat(Generator(runner, Sampling(temperature=0)), tok, 8, 0, inp=io.StringIO("今天天气\n\n"), out=out,
                    template=cfg.data.chat_template)
    assert dialogue[-1] == Message("assistant", "真好！"), out.getvalue()
    capsys.readouterr()
    for flags, steps in (([], ["真", "好", "！", ""]), (["--ignore-eos"], 6)):
        assert main(["sample", "--checkpoint", str(tmp_path / "export"), "--prompt", "[CLS]今天天气[SEP]", "--trace",
                     "--json", "--temperature", "0", "--max-tokens", "6", *flags]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["prompt_ids"] == [2, *bert.encode("今天天气"), 3]
        got = [step["text"] for step in doc["steps"]]
        assert got == steps if isinstance(steps, list) else len(got) == steps
