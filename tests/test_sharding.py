"""The same training on 1 device and on meshes of 8 fake devices; mesh and divisibility errors.

Other mesh shapes (data x fsdp x tensor, any factorisation of 8):
    LLM_JAX_TEST_MESHES="4x2x1,1x2x4,1x1x8" pytest tests/test_sharding.py
"""
import os

import jax
import numpy as np
import pytest

from llm_jax.config import Config, MeshConfig, OptimConfig, PeftConfig, TrainConfig, llama
from llm_jax.data.batches import TokenBatch, positions_from_segments, split_microbatches
from llm_jax.errors import MeshError
from llm_jax.model import Transformer, adapters
from llm_jax.parallel import sharding
from llm_jax.parallel.sharding import make_mesh, mesh_shape
from llm_jax.tasks.pretrain import Pretrain
from llm_jax.train import optim, peft, step
from llm_jax.train.state import abstract_state, create_state, with_planned_steps

TASK = Pretrain(Config())

MESHES = [tuple(int(n) for n in m.split("x"))
          for m in os.environ.get("LLM_JAX_TEST_MESHES", "8x1x1,2x2x2,1x4x2").split(",")]
SEQ, BATCH, VOCAB, STEPS = 32, 8, 128, 4


def packed_batches(n_steps, microbatches=1, seed=0):
    """Random token streams with a few EOS-separated documents per row and ragged padding."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_steps):
        tokens = rng.integers(4, VOCAB, (BATCH, SEQ + 1)).astype(np.int32)
        segments = np.cumsum(rng.random((BATCH, SEQ)) < 0.1, axis=1).astype(np.int32) + 1
        weights = (rng.random((BATCH, SEQ)) < 0.9).astype(np.float32)
        batch = TokenBatch(inputs=tokens[:, :-1], targets=tokens[:, 1:], segment_ids=segments,
                           positions=positions_from_segments(segments), weights=weights,
                           target_bytes=rng.integers(0, 4, (BATCH, SEQ)).astype(np.int32))
        out.append(split_microbatches(microbatches, batch))
    return out


def run(mesh_cfg, devices=None, microbatches=1, steps=STEPS, recipe=False, peft_method="none"):
    """The metrics of each step and the last state; with peft_method, also the frozen base it trained on and a
    host copy of the initial (adapters, frozen base)."""
    # Every dimension divisible by 8, so any factorisation of 8 devices is a valid mesh; still GQA (2:1).
    switches = dict(qk_norm=True, logit_softcap=5.0, mlp="relu2", dropout=0.1) if recipe else {}
    cfg = llama(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=16, n_kv_heads=8, head_dim=8, d_ff=128,
                compute_dtype="float32", **switches)
    mesh = make_mesh(mesh_cfg, devices)
    model = Transformer(cfg, peft=PeftConfig(method=peft_method, rank=4, virtual_tokens=4))
    ocfg = OptimConfig(learning_rate=1e-2, warmup_steps=1, **(dict(optimizer="muon", schedule="wsd") if recipe else {}))
    optimizer = optim.make_optimizer(ocfg)
    select = peft.trainable(Config(peft=PeftConfig(method=peft_method)))
    layout = abstract_state(model, optimizer, mesh, SEQ, select)
    state, shardings = create_state(model, optimizer, layout, SEQ, jax.random.key(0), select)
    state = with_planned_steps(state, steps)
    frozen = {}
    if peft_method != "none":  # a random base, laid out by the same rules
        whole, _ = create_state(model, optimizer, abstract_state(model, optimizer, mesh, SEQ), SEQ, jax.random.key(1))
        frozen = {peft.BASE: peft.frozen_part(whole.params)}
    task = Pretrain(Config(train=TrainConfig(z_loss=1e-3))) if recipe else TASK
    train_fn = step.jit_train_step(model, optimizer, ocfg, mesh, shardings, task,
                                   jax.tree.map(lambda x: x.sharding, frozen))
    initial = jax.tree.map(np.array, (state.params, frozen))  # (the step donates the state)
    batch_shardings = step.batch_shardings(mesh, TASK, microbatched=True)
    history = []
    for batch in packed_batches(steps, microbatches):
        state, metrics = train_fn(state, sharding.global_batch(batch, batch_shardings), frozen)
        history.append({k: float(v) for k, v in metrics.items()})
    return (history, state, frozen, initial) if peft_method != "none" else (history, state)


@pytest.fixture(scope="module")
def single_device():
    return run(MeshConfig(1, 1, 1), jax.devices()[:1])


# 2x2x2 splits every axis at once: the fast subset runs it alone.
@pytest.mark.parametrize("shape", [s if s == (2, 2, 2) else pytest.param(s, marks=pytest.mark.slow) for s in MESHES],
                         ids=lambda s: "x".join(map(str, s)))
def test_same_losses_on_one_device_and_on_a_mesh(single_device, shape):
    reference, ref_state = single_device
    history, state = run(MeshConfig(*shape))
    for key in ("train/loss_bits_per_token", "train/bits_per_byte", "optim/grad_norm", "optim/param_norm"):
        np.testing.assert_allclose([h[key] for h in history], [h[key] for h in reference], rtol=2e-5, err_msg=key)
    kernel = state.params["layers"]["attn"]["q"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(kernel.sharding.device_set) == 8


def test_recipe_switches_same_on_one_device_and_on_a_mesh():
    """Muon, the WSD schedule, QK-norm, logit soft-capping, ReLU², the z-loss and dropout (the same masks:
    the key is split alike however the arrays are laid out) on the 2x2x2 mesh."""
    reference, _ = run(MeshConfig(1, 1, 1), jax.devices()[:1], recipe=True)
    history, state = run(MeshConfig(2, 2, 2), recipe=True)
    for key in ("train/loss_bits_per_token", "optim/grad_norm", "optim/param_norm", "optim/learning_rate"):
        np.testing.assert_allclose([h[key] for h in history], [h[key] for h in reference], rtol=1e-4, err_msg=key)
    assert reference[-1]["train/loss_bits_per_token"] < reference[0]["train/loss_bits_per_token"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "prompt", "prefix"])
def test_peft_same_on_one_device_and_on_a_mesh_trains_only_adapters(method):
    """Adapters on the 2x2x2 mesh train as on one device; every adapter moves, the frozen base is bitwise
    unchanged, and the optimizer holds moments for the adapters only."""
    reference, *_ = run(MeshConfig(1, 1, 1), jax.devices()[:1], peft_method=method)
    history, state, frozen, (initial, base) = run(MeshConfig(2, 2, 2), peft_method=method)
    for key in ("train/loss_bits_per_token", "optim/grad_norm", "optim/param_norm"):
        np.testing.assert_allclose([h[key] for h in history], [h[key] for h in reference], rtol=2e-5, err_msg=key)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, frozen), base)  # bitwise unchanged
    moved = jax.tree_util.tree_map_with_path(lambda path, a, b: (jax.tree_util.keystr(path), bool(np.any(
        np.asarray(a) != np.asarray(b)))), state.params, initial)
    assert all(m for _, m in jax.tree.leaves(moved, is_leaf=lambda x: isinstance(x, tuple))), moved
    names = {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert names <= set(adapters.ADAPTERS), names
    adapter_size = sum(x.size for x in jax.tree.leaves(state.params))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim]
    assert sum(x.size for x in moments) == 2 * adapter_size  # Adam's mu and nu, nothing for the base


@pytest.mark.slow
def test_gradient_accumulation_equals_one_big_batch(single_device):
    reference, _ = single_device
    accumulated, _ = run(MeshConfig(1, 1, 1), jax.devices()[:1], microbatches=4)
    # grad_norm is the norm of the normalised gradient: a per-microbatch normalisation would change it.
    for key in ("train/loss_bits_per_token", "train/bits_per_byte", "optim/grad_norm", "optim/param_norm"):
        np.testing.assert_allclose([h[key] for h in accumulated], [h[key] for h in reference], rtol=2e-5,
                                   err_msg=key)


def test_mesh_fill_axis():
    assert mesh_shape(MeshConfig(2, -1, 2), 8) == (2, 2, 2)
    assert mesh_shape(MeshConfig(1, -1, 1), 8) == (1, 8, 1)


@pytest.mark.parametrize("mesh_cfg, message", [
    (MeshConfig(3, -1, 1), "8 devices are not divisible by 3"),
    (MeshConfig(2, 2, 1), "needs 4 devices but 8 are available"),
    (MeshConfig(0, -1, 1), "mesh.data=0"),
])
def test_bad_mesh_is_a_clear_error(mesh_cfg, message):
    with pytest.raises(MeshError, match=message):
        make_mesh(mesh_cfg)


def test_dimension_the_mesh_cannot_split_fails_before_compiling():
    cfg = llama(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
    mesh = make_mesh(MeshConfig(1, 2, 4))
    optimizer = optim.make_optimizer(OptimConfig())
    with pytest.raises(MeshError, match=r"parameter layers/attn/k/kernel: dimension 2 \(kv_heads=2\) cannot be "
                                        r"split over mesh tensor=4"):
        abstract_state(Transformer(cfg), optimizer, mesh, SEQ)


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(MeshError, match="no rule"):
        sharding.mesh_axes_for("nonexistent_axis")
