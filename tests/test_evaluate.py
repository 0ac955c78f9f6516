"""`llm-jax eval`: bits/byte equal to a hand computation, windows that score every token once, JSONL input."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from llm_jax.cli.main import main
from llm_jax.config import Config, DataConfig, llama, to_json
from llm_jax.data.tokenizer import Tokenizer, train_tokenizer
from llm_jax.evaluation import baselines
from llm_jax.evaluation.text import _batch, objective, windows
from llm_jax.inference.runner import ModelRunner
from llm_jax.model import Transformer

TEXT = "The cat sees the dog. 猫看见了狗。\ndef f(x):\n    return x + 1\n"


def write_export(out, cfg, params):
    """An `llm-jax export`-shaped directory of `params` with a tokenizer trained here."""
    out.mkdir(exist_ok=True)
    train_tokenizer([TEXT * 20, "the dog likes the fish.\n" * 50], out / "tokenizer", vocab_size=320)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((out / "params").absolute(), params)
    (out / "config.json").write_text(to_json(cfg))
    return out


def tiny_config(**model):
    return Config(model=llama(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                              compute_dtype="float32", init_std=0.5, **model), data=DataConfig(seq_len=64))


def random_export(tmp_path_factory, seed: int = 3):
    """(directory, config, params, tokenizer) of a tiny random model's export."""
    cfg = tiny_config()
    dummy = jnp.ones((1, 4), jnp.int32)
    params = nn.unbox(Transformer(cfg.model).init(jax.random.key(seed), dummy, dummy, dummy))["params"]
    out = write_export(tmp_path_factory.mktemp("export"), cfg, params)
    return out, cfg, params, Tokenizer.load(out / "tokenizer.model")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return random_export(tmp_path_factory)


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
    assert r["baselines_bits_per_byte"] == pytest.approx(baselines.bits_per_byte(TEXT.encode()))
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


def float32_avals(jaxpr):
    """The float32 shapes of every value a jaxpr computes, inside scans, remat and custom_vjp calls too."""
    for eqn in jaxpr.eqns:
        yield from (v.aval.shape for v in eqn.outvars if getattr(v.aval, "dtype", None) == jnp.float32)
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    yield from float32_avals(getattr(sub, "jaxpr", sub))


def test_eval_with_logits_chunk_equals_eval_without_and_never_builds_whole_logits(export, tmp_path, capsys):
    out, cfg, params, tok = export
    chunked_cfg = tiny_config(logits_chunk=64)
    chunked = write_export(tmp_path / "chunked", chunked_cfg, params)  # the same params, another config
    (tmp_path / "a.txt").write_text(TEXT * 3, encoding="utf-8")
    results = []
    for checkpoint in (out, chunked):
        assert main(["eval", "--checkpoint", str(checkpoint), "--text", str(tmp_path / "a.txt"), "--json",
                     "--context", "16"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["tokens"] == results[1]["tokens"] and results[0]["bytes"] == results[1]["bytes"]
    assert results[1]["bits_per_byte"] == pytest.approx(results[0]["bits_per_byte"], rel=1e-5)

    B, T, V = 4, 16, 320
    batch = _batch(windows(tok.encode(TEXT), tok.eos_id, T, T // 2), B, T, tok.byte_lengths(), tok.pad_id)
    shapes = {name: set(float32_avals(jax.make_jaxpr(objective(ModelRunner(c.model, params)))(params, batch).jaxpr))
              for name, c in (("plain", cfg), ("chunked", chunked_cfg))}
    assert (B, T, V) in shapes["plain"]  # the check can fail: without chunks the logits are whole
    assert not [s for s in shapes["chunked"] if s[-1:] == (V,) and len(s) == 3], shapes["chunked"]
    assert (B, T, 64) in shapes["chunked"]
