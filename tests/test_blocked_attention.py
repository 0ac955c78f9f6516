"""model/blocked_attention.py equals attention.attend's einsum path, in value and in gradient."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.model.attention import attend, causal_segment_mask
from llm_jax.model.blocked_attention import blocked_attend


def _inputs(B=2, T=45, N=6, K=2, H=8, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, N, H))
    k, v = jax.random.normal(kk, (B, T, K, H)), jax.random.normal(kv, (B, T, K, H))
    # Packed documents of uneven lengths and trailing padding (segment 0) in the first row; one document in
    # the second.
    seg = np.ones((B, T), np.int32)
    seg[0, 10:23], seg[0, 23:40], seg[0, 40:] = 2, 3, 0
    return q, k, v, jnp.asarray(seg)


def _einsum(q, k, v, seg):
    return attend(q, k, v, causal_segment_mask(seg), "einsum")


@pytest.mark.parametrize("block", [8, 16, 64], ids=["T=45 over 6 blocks", "3 blocks", "one block"])
def test_equals_the_einsum_path(block):
    q, k, v, seg = _inputs()
    np.testing.assert_allclose(blocked_attend(q, k, v, seg, block_size=block), _einsum(q, k, v, seg),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("block", [16, 64], ids=["3 blocks", "one block"])
def test_gradients_equal_the_einsum_path(block):
    q, k, v, seg = _inputs()
    weights = jax.random.normal(jax.random.key(1), q.shape)  # a loss that weighs every output differently

    def loss(fn):
        return lambda q, k, v: jnp.sum(weights * fn(q, k, v, seg))

    blocked = jax.grad(loss(lambda *a: blocked_attend(*a, block_size=block)), argnums=(0, 1, 2))(q, k, v)
    reference = jax.grad(loss(_einsum), argnums=(0, 1, 2))(q, k, v)
    for name, got, want in zip("qkv", blocked, reference):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_backward_keeps_no_sequence_by_sequence_array():
    """The compiled forward + backward holds nothing of T x T: XLA's scratch stays far under the scores'."""
    B, T, N, K, H = 1, 512, 4, 2, 8
    q, k, v, seg = _inputs(B, T, N, K, H)
    grad = jax.jit(jax.grad(lambda q, k, v: jnp.sum(blocked_attend(q, k, v, seg, block_size=64)), argnums=(0, 1, 2)))
    scratch = grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes
    assert scratch < B * N * T * T * 4 / 4, scratch


def test_model_with_blocked_attention_matches_einsum_and_generates():
    """model.attention_impl=blocked: the same logits as einsum; the KV-cache decoder (which keeps the einsum path
    over its cache) gives the same logits too."""
    from llm_jax.config import llama
    from llm_jax.model import Transformer
    cfg = llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, compute_dtype="float32",
                attention_impl="einsum")
    _, _, _, seg = _inputs(T=45)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, seg.shape), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(45), seg.shape)
    # (jitted: run eagerly, each of the model's operations compiles on its own)
    params = jax.jit(Transformer(cfg).init)(jax.random.key(0), tokens, positions, seg)["params"]
    blocked = Transformer(dataclasses.replace(cfg, attention_impl="blocked"))
    apply_blocked = jax.jit(blocked.apply)
    np.testing.assert_allclose(apply_blocked({"params": params}, tokens, positions, seg),
                               jax.jit(Transformer(cfg).apply)({"params": params}, tokens, positions, seg), atol=1e-5)
    decoder = Transformer(blocked.cfg, decode=True)
    # An empty cache, as the generator makes one (init also writes its inputs' keys into it).
    cache = jax.tree.map(jnp.zeros_like, jax.eval_shape(decoder.init, jax.random.key(0), tokens[:, :40],
                                                        positions[:, :40], seg[:, :40])["cache"])
    prefill, _ = jax.jit(functools.partial(decoder.apply, mutable=["cache"]))(
        {"params": params, "cache": cache}, tokens[:, :40], positions[:, :40], seg[:, :40])
    np.testing.assert_allclose(prefill, apply_blocked({"params": params}, tokens[:, :40], positions[:, :40],
                                                      seg[:, :40]), atol=1e-5)
