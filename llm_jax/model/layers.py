"""Building blocks: dtype resolution, partitioned initialisers, norms, rotary embeddings, feed-forward.

Shape letters: the legend in transformer.py.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from llm_jax.config import ModelConfig, PeftConfig
from llm_jax.model.adapters import lora_update


def compute_dtype(cfg: ModelConfig):
    if cfg.compute_dtype == "auto":
        # bf16 matmuls are what accelerators are fast at; on CPU they are slower and less exact.
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(cfg.compute_dtype)


def param_dtype(cfg: ModelConfig):
    return jnp.dtype(cfg.param_dtype)


def kernel_init(std: float, *names: str):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


class Dense(nn.Module):
    """Contracts the last `n_in` dims of x with a kernel of shape (*in, *features) named `names`.

    Unlike nn.DenseGeneral, the kernel is created at its true rank, so its logical names (and the
    sharding constraint they imply) apply from initialisation on. With peft.method=lora and a path that
    peft.targets matches, the kernel gains LoRA's low-rank update (model/adapters.py).
    """
    cfg: ModelConfig
    features: tuple[int, ...]
    names: tuple[str, ...]
    n_in: int = 1
    std: float | None = None
    peft: PeftConfig = PeftConfig()
    bias: bool | None = None  # None: model.use_bias

    @nn.compact
    def __call__(self, x):
        cfg, dtype = self.cfg, compute_dtype(self.cfg)
        std = cfg.init_std if self.std is None else self.std
        shape = x.shape[-self.n_in:] + self.features
        kernel = self.param("kernel", kernel_init(std, *self.names), shape, param_dtype(cfg))
        # One flat row axis: the kernel's gradient then contracts a single axis, a plain matrix product;
        # contracting (batch, length) together is several times slower on XLA's CPU backend.
        lead = x.shape[:-self.n_in]
        rows = x.reshape(-1, *x.shape[len(lead):])
        y = jnp.tensordot(rows.astype(dtype), kernel.astype(dtype), axes=self.n_in)
        if (update := lora_update(self, self.peft, rows, self.n_in, self.features, self.names, dtype)) is not None:
            y = y + update
        y = y.reshape(*lead, *self.features)
        if cfg.use_bias if self.bias is None else self.bias:
            bias_init = nn.with_logical_partitioning(nn.initializers.zeros, self.names[self.n_in:])
            y = y + self.param("bias", bias_init, self.features, param_dtype(cfg)).astype(dtype)
        return y


def norm(cfg: ModelConfig, name: str) -> nn.Module:
    common = dict(epsilon=cfg.norm_eps, dtype=compute_dtype(cfg), param_dtype=param_dtype(cfg),
                  scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), name=name)
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(**common)
    return nn.LayerNorm(bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), **common)


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotating the two halves of each head (the Llama / HF layout)."""
    half = x_BxTxNxH.shape[-1] // 2
    freq_h = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) / half)
    angle_BxTxh = positions_BxT[..., None].astype(jnp.float32) * freq_h
    sin, cos = jnp.sin(angle_BxTxh)[:, :, None, :], jnp.cos(angle_BxTxh)[:, :, None, :]
    x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxTxNxH.dtype)


class MLP(nn.Module):
    """SwiGLU (Llama), GELU (GPT-2) or ReLU² (Primer; the modded-nanogpt records) feed-forward."""
    cfg: ModelConfig
    peft: PeftConfig = PeftConfig()

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        # Residual-branch outputs get GPT-2's 1/sqrt(2L) init so the stream's variance stays put with depth.
        out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        up_BxTxF = Dense(cfg, (cfg.d_ff,), ("embed", "mlp"), peft=self.peft, name="up")(x_BxTxD)
        if cfg.mlp == "swiglu":
            gate_BxTxF = Dense(cfg, (cfg.d_ff,), ("embed", "mlp"), peft=self.peft, name="gate")(x_BxTxD)
            h_BxTxF = nn.silu(gate_BxTxF) * up_BxTxF
        elif cfg.mlp == "relu2":
            h_BxTxF = jnp.square(nn.relu(up_BxTxF))
        else:
            h_BxTxF = nn.gelu(up_BxTxF, approximate=True)
        h_BxTxF = nn.with_logical_constraint(h_BxTxF, ("batch", "length", "act_mlp"))
        return Dense(cfg, (cfg.d_model,), ("mlp", "embed"), std=out_std, peft=self.peft, name="down")(h_BxTxF)


def softcap(logits: jax.Array, cap: float) -> jax.Array:
    """cap * tanh(logits / cap) (model.logit_softcap; 0: unchanged): every logit stays within (-cap, cap)."""
    return cap * jnp.tanh(logits / cap) if cap else logits
