"""Arithmetic coding with a language model: the coder alone, exact round trips of any bytes, size vs entropy."""
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llm_jax.config import llama
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.errors import CheckpointError, DataError
from llm_jax.inference import codec
from llm_jax.inference.arithmetic import Decoder, Encoder, decode_symbol, quantise
from llm_jax.inference.codec import HEADER_SIZE, compress_bytes, compress_with_stats, decompress_bytes, to_tokens
from llm_jax.inference.runner import ModelRunner
from llm_jax.model import Transformer

ENGLISH = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
           "foolishness, it was the epoch of belief, it was the epoch of incredulity.\n")
CHINESE = "床前明月光，疑是地上霜。举头望明月，低头思故乡。你好，请问今天天气怎么样？\n"
CODE = "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i * 2))\n"
CONTEXT = 64


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer([ENGLISH * 8, CHINESE * 8, CODE * 8], tmp_path_factory.mktemp("tok") / "tok",
                           vocab_size=320)


def params_for(cfg, seed=0):
    dummy = jnp.zeros((1, 8), jnp.int32)
    init = jax.jit(Transformer(cfg).init)(jax.random.key(seed), dummy, dummy, jnp.ones_like(dummy))
    return nn.unbox(init)["params"]


@pytest.fixture(scope="module")
def runner(tok):
    cfg = llama(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, compute_dtype="float32")
    return ModelRunner(cfg, params_for(cfg))


def code_stream(symbols, cum_tables):
    encoder = Encoder()
    for s, cum in zip(symbols, cum_tables):
        encoder.encode(int(cum[s]), int(cum[s + 1]), int(cum[-1]))
    return encoder.finish()


@pytest.mark.parametrize("skew", [0.0, 3.0, 12.0])
def test_the_arithmetic_coder_round_trips_and_stays_near_the_ideal_size(skew):
    rng = np.random.default_rng(int(skew))
    tables, symbols, ideal_bits = [], [], 0.0
    for _ in range(3000):
        V = int(rng.integers(2, 300))
        freq = np.clip(np.exp(skew * rng.standard_normal(V)) * 1000, 1, 2**20).astype(np.int64)
        cum = np.concatenate([[0], np.cumsum(freq)])
        # Mostly likely symbols, sometimes any symbol: the rarest ones exercise long carry runs.
        s = int(rng.choice(V, p=freq / freq.sum()) if rng.random() < 0.9 else rng.integers(V))
        tables.append(cum)
        symbols.append(s)
        ideal_bits -= math.log2(freq[s] / cum[-1])
    payload = code_stream(symbols, tables)
    decoder = Decoder(payload)
    assert [decode_symbol(decoder, cum) for cum in tables] == symbols
    assert len(payload) <= ideal_bits / 8 + 4


def test_quantised_frequencies_are_never_zero_and_fit_the_total():
    logits = np.array([80.0, -80.0, 0.0, 1e-3] * 100, np.float32)
    p, cum = quantise(logits)
    assert np.all(np.diff(cum) >= 1) and cum[-1] <= 2**24 and abs(p.sum() - 1) < 1e-12


def test_any_bytes_become_tokens_that_decode_back_exactly(tok):
    rng = np.random.default_rng(0)
    for data in [b"", ENGLISH.encode(), CHINESE.encode(), b"\xff\xfe" + CHINESE.encode()[:-1] + b"\x80abc",
                 rng.bytes(500), "▁ x\udcff".encode("utf-8", "surrogatepass")]:
        assert tok.decode_bytes(to_tokens(data, tok)) == data


@pytest.mark.parametrize("name", ["english", "chinese", "code", "random", "empty", "multiwindow"])
def test_compression_round_trips_exactly(tok, runner, name):
    rng = np.random.default_rng(1)
    data = {"english": ENGLISH.encode(), "chinese": CHINESE.encode() * 2, "code": CODE.encode(),
            "random": rng.bytes(300) + b"\xc3\x28\xe2\x82", "empty": b"",
            "multiwindow": (ENGLISH + CODE + CHINESE).encode() * 2}[name]
    blob, stats = compress_with_stats(data, runner, tok, CONTEXT)
    if name == "multiwindow":
        assert stats["tokens"] > 2 * CONTEXT  # crosses window boundaries
    assert decompress_bytes(blob, runner, tok) == data
    # Payload within 1% (+ a few bytes) of the model's cross-entropy: the quantisation and coder cost little.
    assert stats["payload_bytes"] <= 1.01 * stats["cross_entropy_bytes"] + 16
    assert len(blob) == HEADER_SIZE + stats["payload_bytes"]


def test_another_model_or_corruption_gives_a_clear_error_and_no_file(tok, runner, tmp_path):
    blob = compress_bytes(ENGLISH.encode(), runner, tok, CONTEXT)
    with pytest.raises(CheckpointError, match="different checkpoint"):
        decompress_bytes(blob, ModelRunner(runner.cfg, params_for(runner.cfg, seed=1)), tok)
    with pytest.raises(DataError, match="truncated or corrupt"):
        decompress_bytes(blob[:HEADER_SIZE + (len(blob) - HEADER_SIZE) // 2], runner, tok)
    flipped = bytearray(blob)
    flipped[HEADER_SIZE + 3] ^= 0x10
    with pytest.raises(DataError, match="truncated or corrupt"):
        decompress_bytes(bytes(flipped), runner, tok)
    with pytest.raises(DataError, match="not an llm_jax compressed file"):
        decompress_bytes(b"LLMX" + blob[4:], runner, tok)


def test_files_round_trip_and_a_failed_decompression_writes_nothing(tok, runner, tmp_path, monkeypatch):
    cfg = runner.cfg
    loaded = {"params": runner.params}
    checkpoint = SimpleNamespace(model=cfg, data=SimpleNamespace(seq_len=CONTEXT))
    monkeypatch.setattr(ModelRunner, "load",
                        lambda path, step=None: (checkpoint, ModelRunner(cfg, loaded["params"]), tok))
    (tmp_path / "in.txt").write_bytes(CODE.encode())
    stats = codec.compress_file("ckpt", tmp_path / "in.txt", tmp_path / "in.llmz")
    assert stats["context"] == CONTEXT and stats["output_bytes"] == (tmp_path / "in.llmz").stat().st_size
    codec.decompress_file("ckpt", tmp_path / "in.llmz", tmp_path / "out.txt")
    assert (tmp_path / "out.txt").read_bytes() == CODE.encode()
    loaded["params"] = params_for(cfg, seed=2)
    with pytest.raises(CheckpointError, match="different checkpoint"):
        codec.decompress_file("ckpt", tmp_path / "in.llmz", tmp_path / "again.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.llmz", "in.txt", "out.txt"]


def test_format_1_files_are_still_checked_against_the_config_as_it_was_then():
    """Format 1 hashed ModelConfig's repr of its day (before model.qkv_bias): that text, rebuilt, is what it was;
    format 2 hashes only fields off their defaults, so adding a field changes no file's hash."""
    import hashlib
    from llm_jax.config import ModelConfig
    runner = SimpleNamespace(cfg=ModelConfig(), params={})
    then = ("ModelConfig(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=0, d_ff=384, "
            "max_seq_len=2048, norm='rmsnorm', norm_eps=1e-05, position='rope', rope_theta=10000.0, mlp='swiglu', "
            "tie_embeddings=False, use_bias=False, qk_norm=False, logit_softcap=0.0, init_std=0.02, "
            "param_dtype='float32', compute_dtype='auto', attention_impl='auto', scan_layers=True, logits_chunk=0, "
            "remat='none', reward_init_std=0.0)")
    assert codec.model_sha256(runner, version=1) == hashlib.sha256(then.encode()).digest()
    assert codec.model_sha256(runner) == hashlib.sha256(b"{}").digest()
    with pytest.raises(DataError, match="format version 3 is not supported"):
        codec.read_header(b"LLMZ" + bytes([3]) + bytes(HEADER_SIZE - 5))
