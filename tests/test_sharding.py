"""The same training on 1 device and on meshes of 8 fake devices; mesh and divisibility errors.

Other mesh shapes (data x fsdp x tensor, any factorisation of 8):
    LLM_JAX_TEST_MESHES="4x2x1,1x2x4,1x1x8" pytest tests/test_sharding.py
"""
import os

import jax
import numpy as np
import pytest

from llm_jax import optim, sharding, step
from llm_jax.config import MeshConfig, OptimConfig, llama
from llm_jax.losses import NEXT_TOKEN
from llm_jax.model import Transformer
from llm_jax.sharding import MeshError, make_mesh, mesh_shape
from llm_jax.state import create_state

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
        starts = np.concatenate([np.ones((BATCH, 1), bool), segments[:, 1:] != segments[:, :-1]], axis=1)
        idx = np.arange(SEQ)[None].repeat(BATCH, 0)
        positions = idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
        weights = (rng.random((BATCH, SEQ)) < 0.9).astype(np.float32)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
                 "positions": positions.astype(np.int32), "weights": weights,
                 "target_bytes": rng.integers(0, 4, (BATCH, SEQ)).astype(np.int32)}
        out.append({k: v.reshape(microbatches, BATCH // microbatches, SEQ) for k, v in batch.items()})
    return out


def run(mesh_cfg, devices=None, microbatches=1, steps=STEPS):
    # Every dimension divisible by 8, so any factorisation of 8 devices is a valid mesh; still GQA (2:1).
    cfg = llama(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=16, n_kv_heads=8, head_dim=8, d_ff=128,
                compute_dtype="float32")
    mesh = make_mesh(mesh_cfg, devices)
    model = Transformer(cfg)
    ocfg = OptimConfig(learning_rate=1e-2, warmup_steps=1)
    optimizer = optim.make_optimizer(ocfg, steps)
    state, shardings = create_state(model, optimizer, mesh, SEQ, jax.random.key(0))
    train_fn = step.jit_train_step(model, optimizer, optim.schedule(ocfg, steps), mesh, shardings, NEXT_TOKEN)
    batch_shardings = step.batch_shardings(mesh, NEXT_TOKEN, microbatched=True)
    history = []
    for batch in packed_batches(steps, microbatches):
        state, metrics = train_fn(state, sharding.global_batch(batch, batch_shardings))
        history.append({k: float(v) for k, v in metrics.items()})
    return history, state


@pytest.fixture(scope="module")
def single_device():
    return run(MeshConfig(1, 1, 1), jax.devices()[:1])


@pytest.mark.parametrize("shape", MESHES, ids=lambda s: "x".join(map(str, s)))
def test_same_losses_on_one_device_and_on_a_mesh(single_device, shape):
    reference, ref_state = single_device
    history, state = run(MeshConfig(*shape))
    for key in ("train/loss_bits_per_token", "train/bits_per_byte", "optim/grad_norm", "optim/param_norm"):
        np.testing.assert_allclose([h[key] for h in history], [h[key] for h in reference], rtol=2e-5, err_msg=key)
    kernel = state.params["layers"]["attn"]["q"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert len(kernel.sharding.device_set) == 8


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
    from llm_jax.state import check_fits
    cfg = llama(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
    mesh = make_mesh(MeshConfig(1, 2, 4))
    optimizer = optim.make_optimizer(OptimConfig(), 10)
    with pytest.raises(MeshError, match=r"parameter layers/attn/k/kernel: dimension 2 \(kv_heads=2\) cannot be "
                                        r"split over mesh tensor=4"):
        check_fits(Transformer(cfg), optimizer, mesh, SEQ)


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(MeshError, match="no rule"):
        sharding.mesh_axes_for("nonexistent_axis")
