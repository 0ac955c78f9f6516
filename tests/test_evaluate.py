"""`llm-jax eval`: bits/byte equal to a hand computation, windows that score every token once, JSONL input."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from llm_jax import compression
from llm_jax.cli import main
from llm_jax.config import Config, DataConfig, llama, to_json
from llm_jax.data.tokenizer import Tokenizer, train_tokenizer
from llm_jax.evaluate import windows
from llm_jax.model import Transformer

TEXT = "The cat sees the dog. 猫看见了狗。\ndef f(x):\n    return x + 1\n"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An `llm-jax export`-shaped directory of a tiny random model and a tokenizer trained here."""
    out = tmp_path_factory.mktemp("export")
    train_tokenizer([TEXT * 20, "the dog likes the fish.\n" * 50], out / "tokenizer", vocab_size=320)
    cfg = Config(model=llama(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                             compute_dtype="float32", init_std=0.5),
                 data=DataConfig(seq_len=64))
    dummy = jnp.ones((1, 4), jnp.int32)
    params = nn.unbox(Transformer(cfg.model).init(jax.random.key(3), dummy, dummy, dummy))["params"]
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((out / "params").absolute(), params)
    (out / "config.json").write_text(to_json(cfg))
    return out, cfg, params, Tokenizer.load(out / "tokenizer.model")


def hand_bits_per_byte(cfg, params, tok, text):
    ids = [tok.eos_id, *tok.encode(text)]
    tokens = np.asarray(ids, np.int32)[None]
    logits = Transformer(cfg.model).apply({"params": params}, tokens[:, :-1], np.arange(len(ids) - 1)[None],
                                          np.ones((1, len(ids) - 1), np.int32))
    x = np.asarray(logits, np.float64)[0]
    logp = x - x.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nats = -sum(logp[t, ids[t + 1]] for t in range(len(ids) - 1))
    return nats / math.log(2) / len(text.encode()), len(ids) - 1


def test_eval_bits_per_byte_equals_a_hand_computation(export, tmp_path, capsys):
    out, cfg, params, tok = export
    (tmp_path / "a.txt").write_text(TEXT, encoding="utf-8")
    assert main(["eval", "--checkpoint", str(out), "--text", str(tmp_path / "a.txt"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    expected, n_tokens = hand_bits_per_byte(cfg, params, tok, TEXT)
    assert r["tokens"] == n_tokens and r["bytes"] == len(TEXT.encode())
    assert r["bits_per_byte"] == pytest.approx(expected, rel=1e-4)
    assert r["tokens_per_byte"] == pytest.approx(n_tokens / len(TEXT.encode()))
    assert r["baselines_bits_per_byte"] == pytest.approx(compression.baselines(TEXT.encode()))
    # The same text as a JSONL field, and as a table.
    (tmp_path / "a.jsonl").write_text(json.dumps({"body": TEXT}) + "\n")
    assert main(["eval", "--checkpoint", str(out), "--jsonl", str(tmp_path / "a.jsonl"), "--field", "body"]) == 0
    table = capsys.readouterr().out
    assert f"{expected:9.3f}" in table and "xz -9e" in table


def test_windows_score_every_token_once_with_context_from_the_overlap():
    for n, context, stride in [(10, 8, 4), (10, 8, 8), (3, 8, 4), (20, 5, 2), (17, 4, 1)]:
        ws = windows(list(range(100, 100 + n)), 3, context, stride)
        scored = [t for w in ws for t in w.tokens[1:][w.first_scored:]]
        assert scored == list(range(100, 100 + n))
        assert all(len(w.tokens) <= context + 1 for w in ws) and ws[0].tokens[0] == 3
        assert all(w.first_scored >= context - stride for w in ws[1:])  # every later target sees the overlap


def test_long_text_in_windows_and_bad_input(export, tmp_path, capsys):
    out, *_ = export
    (tmp_path / "long.txt").write_text(TEXT * 6, encoding="utf-8")
    assert main(["eval", "--checkpoint", str(out), "--text", str(tmp_path / "long.txt"), "--context", "16",
                 "--stride", "8", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["bytes"] == len((TEXT * 6).encode()) and 0 < r["bits_per_byte"] < 20
    assert main(["eval", "--checkpoint", str(out), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
