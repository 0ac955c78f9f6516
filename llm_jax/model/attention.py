"""Causal self-attention with grouped KV heads, RoPE, packed-document (segment) masking and a KV cache.

In decode mode the keys and values of every call are appended to a cache (the "cache" collection) of
fixed length S, created by `init` with an input of length S. Queries attend to cached keys at earlier
or equal absolute cache positions of the same segment, so left-padded prompts (segment 0) are ignored.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from llm_jax.config import ModelConfig, PeftConfig
from llm_jax.model import adapters
from llm_jax.model.blocked_attention import blocked_attend
from llm_jax.model.layers import Dense, apply_rope, norm


def segment_mask(segment_ids_BxT: jax.Array) -> jax.Array:
    """True where query and key belong to the same packed document; padding (0) attends to padding only."""
    return (segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :])


def causal_segment_mask(segment_ids_BxT: jax.Array) -> jax.Array:
    """(B, 1, T, T): key at or before the query, in the same packed document."""
    t = segment_ids_BxT.shape[1]
    return segment_mask(segment_ids_BxT) & (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :])


def attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, impl: str):
    """Softmax attention of N query heads over K shared KV heads.

    "einsum" groups the query heads by their KV head and writes the two products out: on XLA's CPU backend
    this is about twice as fast (forward and backward) as jax.nn.dot_product_attention's XLA path, hence the
    default there. Otherwise jax.nn.dot_product_attention, whose cuDNN kernel (flash attention) is the fast
    one on GPUs; "auto" lets it choose and falls back to XLA where cuDNN cannot run.
    """
    if impl == "einsum" or (impl == "auto" and jax.default_backend() == "cpu"):
        B, T, N, H = q_BxTxNxH.shape
        K = k_BxSxKxH.shape[2]
        q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
        scores_BxKxGxTxS = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH,
                                      preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(H))
        scores_BxKxGxTxS = jnp.where(mask_Bx1xTxS[:, :, None], scores_BxKxGxTxS, jnp.finfo(jnp.float32).min)
        probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxH.dtype)
        return jnp.einsum("bkgts,bskh->btkgh", probs_BxKxGxTxS, v_BxSxKxH).reshape(B, T, N, H)
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS,
                                        implementation=None if impl == "auto" else impl)


def _cached(self, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT):
    """Appends to the cache at each row's own index; returns all cached keys/values and the mask of the new
    queries over them. Per-row indices let a row start a new sequence while the others go on (the server's
    continuous batching); a caller that steps every row together keeps them equal."""
    ck = self.variable("cache", "cached_k", jnp.zeros, k_BxTxKxH.shape, k_BxTxKxH.dtype)
    cv = self.variable("cache", "cached_v", jnp.zeros, v_BxTxKxH.shape, v_BxTxKxH.dtype)
    cseg = self.variable("cache", "segment_ids", jnp.zeros, segment_ids_BxT.shape, jnp.int32)
    index = self.variable("cache", "index", jnp.zeros, segment_ids_BxT.shape[:1], jnp.int32)
    start_B, t = index.value, k_BxTxKxH.shape[1]
    write = jax.vmap(lambda cache, new, start: jax.lax.dynamic_update_slice_in_dim(cache, new, start, axis=0))
    ck.value = write(ck.value, k_BxTxKxH.astype(ck.value.dtype), start_B)
    cv.value = write(cv.value, v_BxTxKxH.astype(cv.value.dtype), start_B)
    cseg.value = write(cseg.value, segment_ids_BxT.astype(jnp.int32), start_B)
    index.value = start_B + t
    ck.value = nn.with_logical_constraint(ck.value, ("batch", "length", "act_kv_heads", "head_dim"))
    cv.value = nn.with_logical_constraint(cv.value, ("batch", "length", "act_kv_heads", "head_dim"))
    s = ck.value.shape[1]
    causal_BxTxS = jnp.arange(s)[None, None, :] <= (start_B[:, None] + jnp.arange(t)[None, :])[:, :, None]
    same_BxTxS = segment_ids_BxT[:, :, None] == cseg.value[:, None, :]
    return ck.value, cv.value, (causal_BxTxS & same_BxTxS)[:, None]


class Attention(nn.Module):
    """Returns the attention output (B, T, D); with return_kv, also this call's rotated keys and values (prompt
    tuning's virtual tokens give theirs to the real tokens' call as virtual_kv). use_cache=False leaves a decoding
    model's cache alone (the virtual tokens)."""
    cfg: ModelConfig
    decode: bool = False
    peft: PeftConfig = PeftConfig()

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, virtual_kv=None, use_cache=True, return_kv=False):
        cfg, peft = self.cfg, self.peft
        n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        qkv = dict(peft=peft, bias=cfg.use_bias or cfg.qkv_bias)
        q_BxTxNxH = Dense(cfg, (n, h), ("embed", "heads", "head_dim"), name="q", **qkv)(x_BxTxD)
        k_BxTxKxH = Dense(cfg, (k, h), ("embed", "kv_heads", "head_dim"), name="k", **qkv)(x_BxTxD)
        v_BxTxKxH = Dense(cfg, (k, h), ("embed", "kv_heads", "head_dim"), name="v", **qkv)(x_BxTxD)
        if cfg.qk_norm:  # over each head's H features, before the rotation
            q_BxTxNxH, k_BxTxKxH = norm(cfg, "q_norm")(q_BxTxNxH), norm(cfg, "k_norm")(k_BxTxKxH)
        if cfg.position == "rope":
            q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, cfg.rope_theta)
            k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, cfg.rope_theta)
        q_BxTxNxH = nn.with_logical_constraint(q_BxTxNxH, ("batch", "length", "act_heads", "head_dim"))
        k_BxTxKxH = nn.with_logical_constraint(k_BxTxKxH, ("batch", "length", "act_kv_heads", "head_dim"))
        v_BxTxKxH = nn.with_logical_constraint(v_BxTxKxH, ("batch", "length", "act_kv_heads", "head_dim"))
        decode = self.decode and use_cache
        if decode and self.has_variable("cache", "cached_k"):  # (init only creates the cache)
            k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS = _cached(self, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
            impl = "einsum" if cfg.attention_impl == "blocked" else cfg.attention_impl  # queries over a cache
            out_BxTxNxH = attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, impl)
        else:
            if decode:
                _cached(self, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
            if cfg.attention_impl == "blocked":
                out_BxTxNxH = blocked_attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
            else:
                out_BxTxNxH = attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, causal_segment_mask(segment_ids_BxT),
                                     cfg.attention_impl)
        if peft.method == "prefix" and virtual_kv is None and adapters.present(self, "prefix_k"):
            virtual_kv = adapters.prefix_kv(self, peft, k, h, cfg.init_std)
        if virtual_kv is not None and (gate_N := adapters.gate(self, peft, n)) is not None:
            out_BxTxNxH = out_BxTxNxH + adapters.attend_virtual(q_BxTxNxH, *virtual_kv, gate_N)
        out_BxTxNxH = nn.with_logical_constraint(out_BxTxNxH, ("batch", "length", "act_heads", "head_dim"))
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        o = Dense(cfg, (cfg.d_model,), ("heads", "head_dim", "embed"), n_in=2, std=out_std, peft=peft, name="o")
        out_BxTxD = o(out_BxTxNxH)
        return (out_BxTxD, (k_BxTxKxH[0], v_BxTxKxH[0])) if return_kv else out_BxTxD
