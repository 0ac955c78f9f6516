"""Causal self-attention with grouped KV heads, RoPE and packed-document (segment) masking."""
from __future__ import annotations

import jax
from flax import linen as nn

from llm_jax.config import ModelConfig
from llm_jax.model.layers import Dense, apply_rope


def segment_mask(segment_ids_BxT: jax.Array) -> jax.Array:
    """True where query and key belong to the same packed document; padding (0) attends to padding only."""
    return (segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :])


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
        cfg = self.cfg
        n, k, h = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        q_BxTxNxH = Dense(cfg, (n, h), ("embed", "heads", "head_dim"), name="q")(x_BxTxD)
        k_BxTxKxH = Dense(cfg, (k, h), ("embed", "kv_heads", "head_dim"), name="k")(x_BxTxD)
        v_BxTxKxH = Dense(cfg, (k, h), ("embed", "kv_heads", "head_dim"), name="v")(x_BxTxD)
        if cfg.position == "rope":
            q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, cfg.rope_theta)
            k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, cfg.rope_theta)
        q_BxTxNxH = nn.with_logical_constraint(q_BxTxNxH, ("batch", "length", "act_heads", "head_dim"))
        k_BxTxKxH = nn.with_logical_constraint(k_BxTxKxH, ("batch", "length", "act_kv_heads", "head_dim"))
        v_BxTxKxH = nn.with_logical_constraint(v_BxTxKxH, ("batch", "length", "act_kv_heads", "head_dim"))
        implementation = None if cfg.attention_impl == "auto" else cfg.attention_impl
        out_BxTxNxH = jax.nn.dot_product_attention(
            q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=segment_mask(segment_ids_BxT), is_causal=True,
            implementation=implementation)
        out_BxTxNxH = nn.with_logical_constraint(out_BxTxNxH, ("batch", "length", "act_heads", "head_dim"))
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        o = Dense(cfg, (cfg.d_model,), ("heads", "head_dim", "embed"), n_in=2, std=out_std, name="o")
        return o(out_BxTxNxH)
