"""benchmarks/torch_reference.py is the same model and train step as llm_jax, written in eager PyTorch.

These tests need torch, which only the `torch` extra installs (`pip install -e '.[test,torch]'`); the main
test environment leaves it out to stay lean, so there the whole module is skipped by the importorskip below.
That is the one intended skip: in an environment with the extra every test here runs.
"""
import dataclasses
import importlib.util
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

from llm_jax.config import OptimConfig, llama  # noqa: E402
from llm_jax.model import Transformer  # noqa: E402
from llm_jax.tasks.losses import token_nats  # noqa: E402
from llm_jax.train.metrics import param_count  # noqa: E402
from llm_jax.train.optim import make_optimizer  # noqa: E402

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "torch_reference.py"
_spec = importlib.util.spec_from_file_location("torch_reference", _PATH)
tr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tr)

TINY = llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, scan_layers=False)


def _llm_jax_params(cfg, seed=0):
    dummy = np.zeros((1, 8), np.int32)
    return nn.unbox(Transformer(cfg).init(jax.random.key(seed), dummy, dummy, dummy + 1))["params"]


def _inputs(cfg, batch=2, length=16, seed=0):
    tokens = np.random.RandomState(seed).randint(0, cfg.vocab_size, (batch, length + 1)).astype(np.int32)
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length))
    return tokens[:, :-1], tokens[:, 1:], positions, np.ones((batch, length), np.int32)


def _varied(params, seed=1):
    """Norm scales away from 1, so that a misplaced norm would show in the logits."""
    key = jax.random.key(seed)
    def vary(path, a):
        if getattr(path[-1], "key", None) != "scale":
            return a
        return a * (1.0 + 0.5 * jax.random.normal(jax.random.fold_in(key, hash(jax.tree_util.keystr(path)) % 2**31),
                                                  a.shape))
    return jax.tree_util.tree_map_with_path(vary, params)


@pytest.mark.parametrize("cfg", [
    llama(vocab_size=2048, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=384),
    llama(vocab_size=2048, d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, d_ff=1024),
], ids=["3x128", "6x384"])
def test_same_parameter_count_as_llm_jax(cfg):
    model, _ = tr.build(cfg, OptimConfig())
    dummy = np.zeros((1, 4), np.int32)
    shapes = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), dummy, dummy, dummy + 1))["params"]
    assert tr.param_count(model) == sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(shapes)))


@pytest.mark.parametrize("scan_layers", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_forward_matches_llm_jax(scan_layers):
    # A larger init than the default 0.02 makes attention far from uniform, so RoPE and the GQA head mapping
    # change the logits by O(1): a wrong convention could not hide under the tolerance.
    cfg = dataclasses.replace(TINY, init_std=0.3, scan_layers=scan_layers)
    params = _varied(_llm_jax_params(cfg))
    inputs, targets, positions, segments = _inputs(cfg)
    expected = np.asarray(Transformer(cfg).apply({"params": params}, inputs, positions, segments))

    model, _ = tr.build(cfg, OptimConfig())
    tr.load_llm_jax_params(model, params)
    with torch.no_grad():
        logits = model(torch.from_numpy(inputs).long())
    assert logits.dtype == torch.float32
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(logits.numpy(), expected, atol=1e-4, rtol=0)

    nats = float(np.mean(np.asarray(token_nats(expected, targets))))
    loss = torch.nn.functional.cross_entropy(logits.view(-1, cfg.vocab_size), torch.from_numpy(targets).long().view(-1))
    assert loss.item() == pytest.approx(nats, abs=1e-5)


@pytest.mark.slow
def test_train_step_matches_llm_jax_update():
    """One step of clipped AdamW with weight decay from the same params gives the same params.

    Adam's first step is lr * g / (|g| + eps): with the default eps it jumps between -lr and lr for gradients
    near 0, where float32 rounding decides the sign; eps=1e-4 keeps it smooth there, so the comparison is tight.
    """
    cfg = dataclasses.replace(TINY, init_std=0.1)
    optim_cfg = OptimConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.5, eps=1e-4, grad_clip=0.5)
    params = _varied(_llm_jax_params(cfg))
    inputs, targets, positions, segments = _inputs(cfg)

    def loss_fn(p):
        logits = Transformer(cfg).apply({"params": p}, inputs, positions, segments)
        return token_nats(logits, targets).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    optimizer = make_optimizer(optim_cfg)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    new_params = optax.apply_updates(params, updates)
    assert float(optax.tree.norm(grads)) > optim_cfg.grad_clip  # the clipping is exercised

    model, optimizer = tr.build(cfg, optim_cfg)
    tr.load_llm_jax_params(model, params)
    torch_loss = tr.train_step(model, optimizer, torch.from_numpy(inputs).long(), torch.from_numpy(targets).long(),
                               optim_cfg.grad_clip)
    assert torch_loss == pytest.approx(float(loss), abs=1e-5)

    expected, _ = tr.build(cfg, optim_cfg)
    tr.load_llm_jax_params(expected, new_params)
    for (name, got), want in zip(model.named_parameters(), expected.parameters()):
        np.testing.assert_allclose(got.detach().numpy(), want.detach().numpy(), atol=2e-5, rtol=0, err_msg=name)


@pytest.mark.slow
def test_train_step_reduces_loss():
    model, optimizer = tr.build(TINY, OptimConfig(learning_rate=3e-3))
    inputs, targets, _, _ = _inputs(TINY, batch=4, length=32)
    inputs, targets = torch.from_numpy(inputs).long(), torch.from_numpy(targets).long()
    losses = [tr.train_step(model, optimizer, inputs, targets, grad_clip=1.0) for _ in range(5)]
    assert losses[0] == pytest.approx(np.log(TINY.vocab_size), rel=0.05)  # small init: near-uniform predictions
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_tokens_per_sec_reports_and_restores_threads():
    before = torch.get_num_threads()
    r = tr.tokens_per_sec(TINY, OptimConfig(), batch_size=2, seq_len=16, steps=3, warmup=1, threads=1)
    assert torch.get_num_threads() == before
    assert r["threads"] == 1 and len(r["step_times"]) == 3
    assert r["params"] == param_count(_llm_jax_params(TINY))
    assert r["tokens_per_sec"] == pytest.approx(2 * 16 / r["step_time_s"])
    assert r["step_time_s"] == pytest.approx(float(np.median(r["step_times"])))


def test_rejects_other_architectures():
    with pytest.raises(ValueError, match="Llama"):
        tr.build(dataclasses.replace(TINY, mlp="gelu"), OptimConfig())
