import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from llm_jax.config import ModelConfig, gpt2, llama
from llm_jax.model import Transformer

T = 16


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, compute_dtype="float32")
    return llama(**{**base, **kw})


def inputs(batch=2, seed=0, vocab=97):
    tokens = jax.random.randint(jax.random.key(seed), (batch, T), 0, vocab)
    positions = jnp.broadcast_to(jnp.arange(T), (batch, T))
    return tokens, positions, jnp.ones((batch, T), jnp.int32)


class Jitted:
    """A model whose apply is jitted: eager op-by-op dispatch is what makes CPU tests slow."""

    def __init__(self, cfg):
        self.module = Transformer(cfg)
        self.apply = jax.jit(self.module.apply)


def init_apply(cfg, *args):
    model = Jitted(cfg)
    params = nn.unbox(jax.jit(model.module.init)(jax.random.key(1), *args)["params"])
    return model, params


CONFIGS = {
    "llama": tiny(),
    "gpt2": gpt2(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=T, compute_dtype="float32"),
    "unrolled": tiny(scan_layers=False),
    "remat": tiny(remat="full"),
    "mqa": tiny(n_kv_heads=1),
}


@pytest.mark.parametrize("name", [n if n == "llama" else pytest.param(n, marks=pytest.mark.slow) for n in CONFIGS])
def test_causality_changing_a_future_token_never_changes_earlier_logits(name):
    tokens, positions, segments = inputs()
    model, params = init_apply(CONFIGS[name], tokens, positions, segments)
    logits = model.apply({"params": params}, tokens, positions, segments)
    assert logits.shape == (2, T, 97) and logits.dtype == jnp.float32
    for t in (3, 9, T - 1):
        changed = tokens.at[:, t].set((tokens[:, t] + 1) % 97)
        new = model.apply({"params": params}, changed, positions, segments)
        np.testing.assert_allclose(new[:, :t], logits[:, :t], atol=1e-6, rtol=0)
        assert not np.allclose(new[:, t:], logits[:, t:])  # the change is visible from t on


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_segment_ids_isolate_packed_documents(name):
    """Document B packed after document A gives the same logits as B alone at positions 0.."""
    cfg = CONFIGS[name]
    a = jax.random.randint(jax.random.key(2), (1, 6), 0, 97)
    b = jax.random.randint(jax.random.key(3), (1, T - 6), 0, 97)
    packed = jnp.concatenate([a, b], axis=1)
    positions = jnp.concatenate([jnp.arange(6), jnp.arange(T - 6)])[None]
    segments = jnp.concatenate([jnp.ones(6, jnp.int32), 2 * jnp.ones(T - 6, jnp.int32)])[None]
    model, params = init_apply(cfg, packed, positions, segments)
    together = model.apply({"params": params}, packed, positions, segments)
    alone = model.apply({"params": params}, b, jnp.arange(T - 6)[None], jnp.ones((1, T - 6), jnp.int32))
    np.testing.assert_allclose(together[:, 6:], alone, atol=1e-5, rtol=0)
    other_a = (a + 5) % 97  # and A's content cannot leak into B
    changed = model.apply({"params": params}, jnp.concatenate([other_a, b], 1), positions, segments)
    np.testing.assert_allclose(changed[:, 6:], together[:, 6:], atol=1e-6, rtol=0)


def test_scan_over_layers_equals_unrolled_layers():
    tokens, positions, segments = inputs()
    scanned, params = init_apply(tiny(), tokens, positions, segments)
    unrolled = Jitted(tiny(scan_layers=False))
    layers = params["layers"]
    unrolled_params = {k: v for k, v in params.items() if k != "layers"}
    for i in range(2):
        unrolled_params[f"layer_{i}"] = jax.tree.map(lambda x: x[i], layers)
    np.testing.assert_allclose(unrolled.apply({"params": unrolled_params}, tokens, positions, segments),
                               scanned.apply({"params": params}, tokens, positions, segments), atol=1e-5)


@pytest.mark.slow
def test_remat_changes_memory_not_results():
    tokens, positions, segments = inputs()
    plain, params = init_apply(tiny(), tokens, positions, segments)

    def grads(model):
        loss = lambda p: jnp.sum(model.apply({"params": p}, tokens, positions, segments) ** 2)
        return jax.jit(jax.grad(loss))(params)
    for policy in ("full", "dots", "dots_no_batch"):
        remat = Jitted(tiny(remat=policy))
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads(plain), grads(remat))


@pytest.mark.slow
def test_parameter_layout_and_logical_names():
    tokens, positions, segments = inputs()
    boxed = Transformer(tiny(n_kv_heads=1)).init(jax.random.key(0), tokens, positions, segments)["params"]
    names = nn.get_partition_spec(boxed)
    assert tuple(names["layers"]["attn"]["q"]["kernel"]) == ("layers", "embed", "heads", "head_dim")
    assert tuple(names["layers"]["attn"]["k"]["kernel"]) == ("layers", "embed", "kv_heads", "head_dim")
    assert tuple(names["embed"]["embedding"]) == ("vocab", "embed")
    params = nn.unbox(boxed)
    assert params["layers"]["attn"]["k"]["kernel"].shape == (2, 32, 1, 8)
    assert params["lm_head"]["kernel"].shape == (32, 97)


def test_tied_embeddings_have_no_separate_head():
    tokens, positions, segments = inputs()
    _, params = init_apply(CONFIGS["gpt2"], tokens, positions, segments)
    assert "lm_head" not in params and "pos_embed" in params
    assert "bias" in params["layers"]["mlp"]["up"]


def test_bf16_compute_keeps_float32_params_and_logits():
    tokens, positions, segments = inputs()
    model, params = init_apply(tiny(compute_dtype="bfloat16"), tokens, positions, segments)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    logits = model.apply({"params": params}, tokens, positions, segments)
    ref = Jitted(tiny()).apply({"params": params}, tokens, positions, segments)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, ref, atol=0.05)  # bf16 rounding only


@pytest.mark.slow
def test_attention_implementations_agree_in_logits_and_gradients():
    """einsum (the CPU default) against jax.nn.dot_product_attention's XLA path, on packed documents with
    padding and grouped KV heads; cuDNN is compared the same way where a GPU runs this test."""
    tokens, positions, _ = inputs(batch=3)
    segments = jnp.array([[1] * 6 + [2] * 10, [1] * 16, [1] * 11 + [0] * 5], jnp.int32)
    impls = ["einsum", "xla"] + (["cudnn"] if jax.default_backend() == "gpu" else [])
    results = []
    for impl in impls:
        model, params = init_apply(tiny(attention_impl=impl), tokens, positions, segments)
        loss = lambda p: model.module.apply({"params": p}, tokens, positions, segments).sum()
        results.append(jax.jit(jax.value_and_grad(loss))(params))
    (ref_loss, ref_grads), others = results[0], results[1:]
    for impl, (loss, grads) in zip(impls[1:], others):
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=impl)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=impl), grads, ref_grads)
