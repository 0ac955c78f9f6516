"""Parameter-efficient fine-tuning inside the model (config section `peft`): LoRA's low-rank update of a kernel,
and the gated attention to virtual tokens that prompt and prefix tuning share.

Every adapter parameter has a name of ADAPTERS, and a module creates its adapter only at init or when the params
hold it: the same model applied to params without adapters is the base model. That is how DPO and RL read their
reference (the frozen base, no second copy of the weights), and why an adapter at its initial value (LoRA's B,
the gates: zero) leaves the model exactly the base model.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import linen as nn

from llm_jax.model.dropout import dropout
from llm_jax.task_config import PeftConfig

LORA = ("lora_a", "lora_b")
VIRTUAL = ("prompt", "prefix_k", "prefix_v", "adapter_gate")
ADAPTERS = LORA + VIRTUAL


def present(module: nn.Module, name: str) -> bool:
    """Whether `module` has (or is creating) its adapter parameter `name`."""
    return module.is_initializing() or module.has_variable("params", name)


def param_path(module: nn.Module, name: str) -> str:
    """A parameter's path as peft.targets matches it: "layers/attn/q/kernel" (scanned layers) or
    "layer_0/mlp/up/kernel"."""
    return "/".join((*module.scope.path, name))


def lora_update(module: nn.Module, peft: PeftConfig, rows, n_in: int, features: tuple[int, ...],
                names: tuple[str, ...], dtype):
    """x·A·B·alpha/rank for the kernel of `module` (a Dense of rows (R, *in) -> (R, *features), axes named
    `names`), or None where LoRA does not apply. A starts like PEFT's (uniform, ±1/sqrt(fan-in)), B at zero; x goes
    through peft.dropout where the call has a "dropout" key."""
    if peft.method != "lora" or not re.search(peft.targets, param_path(module, "kernel")) \
            or not present(module, "lora_a"):
        return None
    in_shape = rows.shape[1:]
    rows = dropout(module, rows, peft.dropout)
    a_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=-1)
    a = module.param("lora_a", nn.with_logical_partitioning(a_init, (*names[:n_in], "adapter_rank")),
                     (*in_shape, peft.rank), jnp.float32)
    b = module.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, ("adapter_rank", *names[n_in:])),
                     (peft.rank, *features), jnp.float32)
    low_Rxr = jnp.tensordot(rows.astype(dtype), a.astype(dtype), axes=n_in)
    return (peft.alpha / peft.rank) * jnp.tensordot(low_Rxr, b.astype(dtype), axes=1)


def gate(module: nn.Module, peft: PeftConfig, n_heads: int):
    """tanh of the per-head gate on the attention to virtual tokens (zero at init), or None without one."""
    if peft.method not in ("prompt", "prefix") or not present(module, "adapter_gate"):
        return None
    g = module.param("adapter_gate", nn.with_logical_partitioning(nn.initializers.zeros, ("heads",)),
                     (n_heads,), jnp.float32)
    return jnp.tanh(g)


def prefix_kv(module: nn.Module, peft: PeftConfig, n_kv: int, head_dim: int, std: float):
    """Prefix tuning's learned keys and values of this layer, (V, K, H) each (V virtual tokens)."""
    init = nn.with_logical_partitioning(nn.initializers.normal(std), ("virtual", "kv_heads", "head_dim"))
    shape = (peft.virtual_tokens, n_kv, head_dim)
    return module.param("prefix_k", init, shape, jnp.float32), module.param("prefix_v", init, shape, jnp.float32)


def attend_virtual(q_BxTxNxH, k_VxKxH, v_VxKxH, gate_N):
    """gate · softmax(q·k/sqrt(H))·v over the V virtual tokens, which every query sees: a softmax of its own, so
    that the attention among real tokens is the base model's (LLaMA-Adapter's zero-init attention)."""
    B, T, N, H = q_BxTxNxH.shape
    K = k_VxKxH.shape[1]
    q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
    scores = jnp.einsum("btkgh,vkh->btkgv", q_BxTxKxGxH, k_VxKxH.astype(q_BxTxNxH.dtype),
                        preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(H))
    probs = jax.nn.softmax(scores, axis=-1).astype(q_BxTxNxH.dtype)
    out_BxTxNxH = jnp.einsum("btkgv,vkh->btkgh", probs, v_VxKxH.astype(q_BxTxNxH.dtype)).reshape(B, T, N, H)
    return out_BxTxNxH * gate_N.astype(out_BxTxNxH.dtype)[:, None]


# A head that a task adds to a language model (a reward model's, PPO's value model's) is new: it trains in full,
# beside the adapters.
NEW_HEADS = ("reward_head", "value_head")


def split(params) -> tuple[dict, dict]:
    """(trainable, frozen base) of a params tree: the adapters and new heads, and the rest. Leaves may be boxed
    (logical-axis metadata): only dict keys decide."""
    def walk(tree, trained):
        if not isinstance(tree, dict):
            return (tree, None) if trained else (None, tree)
        parts = {k: walk(v, trained or k in ADAPTERS or k in NEW_HEADS) for k, v in tree.items()}
        return tuple({k: p[i] for k, p in parts.items() if p[i] is not None and not _empty(p[i])} for i in (0, 1))
    return walk(params, False)


def _empty(tree) -> bool:
    return isinstance(tree, dict) and not tree


def merge(trainable: dict, base: dict) -> dict:
    """The whole params tree from split's two halves."""
    out = dict(base)
    for k, v in trainable.items():
        out[k] = merge(v, base[k]) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def fold_lora(params: dict, peft: PeftConfig) -> dict:
    """The params with each kernel's LoRA update added in (W + A·B·alpha/rank) and the LoRA params dropped: the
    base model's tree, giving the same outputs without the low-rank path. Stacked layers lead A, B and W alike."""
    if not isinstance(params, dict):
        return params
    out = {k: fold_lora(v, peft) for k, v in params.items() if k not in LORA}
    if "lora_a" in params:
        a, b, w = params["lora_a"], params["lora_b"], params["kernel"]
        lead = a.ndim + b.ndim - 2 - w.ndim  # stacked layers
        a2 = a.reshape(*a.shape[:lead], -1, a.shape[-1]).astype(jnp.float32)
        b2 = b.reshape(*b.shape[:lead], b.shape[lead], -1).astype(jnp.float32)
        delta = jnp.matmul(a2, b2).reshape(w.shape) * (peft.alpha / peft.rank)
        out["kernel"] = (w.astype(jnp.float32) + delta).astype(w.dtype)
    return out
