"""Tokenizer: exact round trips on any text, exact byte counts, reserved chat tokens, tiny corpora."""
import pickle
import warnings

import numpy as np
import pytest

from llm_jax.errors import DataError
from llm_jax.data.tokenizer import (ENCODE_CHARS, N_RESERVED, SPECIAL_TOKENS, Tokenizer, text_chunks,
                                    train_tokenizer)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It was the best of times, it was the worst of times.\n" * 8,
    "def add(x, y):\n    \"\"\"Adds two numbers.\"\"\"\n    return x + y\n\n\nclass Point:\n\tpass\n" * 8,
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。\n春眠不觉晓，处处闻啼鸟。\n" * 8,
    "for i in range(10):\n        print(i, 'hello  world')  # two  spaces\n" * 8,
]

TEXTS = [
    "Hello, world! The quick brown fox.",
    "床前明月光，疑是地上霜。",
    "emoji 😀🎉 and 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "def f(x):\n\tif x:\n\t\treturn 1\n\n\n    return  2  # indented\n",
    "   leading spaces, multiple   inner   spaces and trailing   ",
    "\n\nnewlines first\r\nand CRLF\r\n",
    " ",
    "",
    "<|user|>literal special text<|end|>",
    "mixed 中文 English 123456 code()",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "tok", vocab_size=320)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_is_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode_bytes(ids) == text.encode()


@pytest.mark.parametrize("text", TEXTS)
def test_byte_lengths_sum_to_utf8_length(tokenizer, text):
    lengths_V = tokenizer.byte_lengths()
    assert lengths_V.shape == (tokenizer.vocab_size,) and lengths_V.dtype == np.int32
    assert int(lengths_V[tokenizer.encode(text)].sum()) == len(text.encode())


def test_layout_and_zero_byte_ids(tokenizer):
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)
    assert tokenizer.specials == {"<pad>": 0, "<s>": 2, "</s>": 3, **{t: 4 + i for i, t in enumerate(SPECIAL_TOKENS)}}
    reserved = [0, 1, 2, 3, *tokenizer.specials.values()]
    assert all(tokenizer.byte_lengths()[reserved] == 0)
    assert tokenizer.decode(reserved) == ""
    assert all(tokenizer.byte_lengths()[8:264] == 1)  # the byte pieces


def test_special_tokens_never_come_from_text_but_do_from_a_prompt(tokenizer):
    specials = set(tokenizer.specials.values())
    assert len(specials) == len(SPECIAL_TOKENS) + 3 and N_RESERVED <= tokenizer.vocab_size
    for text in [*SPECIAL_TOKENS, "".join(SPECIAL_TOKENS), *TEXTS]:
        assert not specials & set(tokenizer.encode(text))
    user, end = tokenizer.specials["<|user|>"], tokenizer.specials["<|end|>"]
    assert tokenizer.encode_prompt("<|user|>hi<|end|><|end|>") == [user, *tokenizer.encode("hi"), end, end]
    assert tokenizer.encode_prompt("plain <|user text") == tokenizer.encode("plain <|user text")


def test_decode_bytes_keeps_a_character_cut_in_two(tokenizer):
    ids = tokenizer.encode("𝔘")  # absent from the corpus: four byte pieces
    assert len(ids) == 4
    assert tokenizer.decode_bytes(ids[:2]) + tokenizer.decode_bytes(ids[2:]) == "𝔘".encode()
    assert tokenizer.decode(ids[:2]) == "\ufffd"


def test_encode_batch_matches_encode_and_whole_text_bpe(tokenizer):
    long_text = "".join(CORPUS) * 20
    assert len(long_text) > 2 * ENCODE_CHARS  # exercises the cutting into pieces
    texts = [long_text, *TEXTS]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]
    assert tokenizer.encode(long_text) == tokenizer._sp.encode(long_text)


def test_load_serialize_and_pickle(tokenizer, tmp_path):
    path = tmp_path / "t.model"
    path.write_bytes(tokenizer.serialized())
    loaded = Tokenizer.load(path)
    assert loaded.sha256 == tokenizer.sha256 and len(loaded.sha256) == 64
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode(TEXTS[3]) == tokenizer.encode(TEXTS[3])
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.model")


def test_training_writes_model_and_shrinks_for_a_tiny_corpus(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tok = train_tokenizer(["tiny corpus, tiny corpus\n"] * 3, tmp_path / "tiny", vocab_size=2000)
    assert N_RESERVED < tok.vocab_size < 2000
    assert any("too small for vocab_size=2000" in str(w.message) for w in caught)
    assert Tokenizer.load(tmp_path / "tiny.model").sha256 == tok.sha256
    assert tok.decode(tok.encode("unseen 文字")) == "unseen 文字"


def test_vocab_below_reserved_is_an_error(tmp_path):
    with pytest.raises(DataError, match="vocab_size=200 is too small"):
        train_tokenizer(CORPUS, tmp_path / "t", vocab_size=200)


def test_unigram_round_trip(tmp_path):
    tok = train_tokenizer(CORPUS, tmp_path / "uni", vocab_size=320, model_type="unigram")
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_text_chunks_are_bounded_and_lossless():
    text = "short line\n" * 50 + "x" * 5000 + "\n" + "中" * 3000
    chunks = list(text_chunks(text, max_bytes=1024))
    assert "".join(chunks) == text
    assert max(len(c.encode()) for c in chunks) <= 1024
