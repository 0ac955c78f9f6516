"""Losses kept as sums (e.g. nats, target tokens, target bytes) so that accumulation over microbatches,
devices and eval batches divides once, by the true totals; and the Objective the train and eval steps run.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from llm_jax.data import pipeline

LN2 = math.log(2.0)


@jax.custom_vjp
def token_nats(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """-log p(target) in nats for every position, computed in float32: logsumexp(logits) - logits[target].

    The gradient, softmax(logits) - onehot(target), is written out as one elementwise pass: autodiff of the
    gather would build a zero (B, T, V) array and scatter into it, which costs as much as the matmul before it
    on CPU.
    """
    return _token_nats_fwd(logits_BxTxV, targets_BxT)[0]


def _token_nats_fwd(logits_BxTxV, targets_BxT):
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return lse_BxT - target_BxT, (logits_BxTxV, targets_BxT, lse_BxT)


def _token_nats_bwd(residuals, g_BxT):
    logits_BxTxV, targets_BxT, lse_BxT = residuals
    vocab_V = jnp.arange(logits_BxTxV.shape[-1], dtype=targets_BxT.dtype)
    onehot_BxTxV = vocab_V == targets_BxT[..., None]
    grad_BxTxV = (jnp.exp(logits_BxTxV - lse_BxT[..., None]) - onehot_BxTxV) * g_BxT[..., None]
    return grad_BxTxV, None


token_nats.defvjp(_token_nats_fwd, _token_nats_bwd)


def lm_sums(logits_BxTxV: jax.Array, batch: dict) -> dict[str, jax.Array]:
    """Sums over the batch: nats of weighted targets, their count and their UTF-8 bytes."""
    return weighted_sums(token_nats(logits_BxTxV, batch["targets"]), batch)


def weighted_sums(nats_BxT: jax.Array, batch: dict) -> dict[str, jax.Array]:
    weights_BxT = batch["weights"].astype(jnp.float32)
    return {
        "nats": jnp.sum(nats_BxT * weights_BxT),
        "tokens": jnp.sum(weights_BxT),
        "bytes": jnp.sum(batch["target_bytes"].astype(jnp.float32) * weights_BxT),
    }


def compression(sums: dict) -> dict:
    """Bits per token and bits per byte from summed nats (works on jax and Python numbers)."""
    tokens = jnp.maximum(sums["tokens"], 1.0)
    bytes_ = jnp.maximum(sums["bytes"], 1.0)
    return {"bits_per_token": sums["nats"] / tokens / LN2, "bits_per_byte": sums["nats"] / bytes_ / LN2}


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the train and eval steps compute for one kind of batch (next-token windows, preference pairs).

    sums(model, params, batch) returns summed quantities; the gradient descends sums[loss] / total sums[count]
    over all microbatches. scalars(sums, prefix) turns accumulated sums into TensorBoard scalars.
    """
    batch_axes: dict[str, tuple]  # logical axis names of each batch entry (the microbatch axis comes on top)
    sums: Callable[..., dict]
    loss: str
    count: str
    scalars: Callable[[dict, str], dict]
    progress: tuple[str, str]  # (label, scalar) shown on the progress bar


def chunked_token_nats(x_BxTxD: jax.Array, kernel_DxV: jax.Array, bias_V: jax.Array | None,
                       targets_BxT: jax.Array, chunk: int) -> jax.Array:
    """token_nats of the logits x @ kernel (+ bias) without materialising them: a scan over vocabulary chunks
    keeps a running max and sum of exponentials in float32 (the log-sum-exp), and each chunk's logits are
    recomputed in the backward pass (jax.checkpoint), so the memory is (B, T, chunk), not (B, T, V)."""
    D, V = kernel_DxV.shape
    if V % chunk:
        raise ValueError(f"model.logits_chunk={chunk} does not divide model.vocab_size={V}")
    kernel_CxDxK = kernel_DxV.astype(x_BxTxD.dtype).reshape(D, V // chunk, chunk).transpose(1, 0, 2)
    bias_CxK = (jnp.zeros(V, jnp.float32) if bias_V is None else bias_V.astype(jnp.float32)).reshape(-1, chunk)

    @jax.checkpoint
    def step(carry, chunk_params):
        max_BxT, sum_BxT = carry
        k_DxK, b_K = chunk_params
        logits_BxTxK = jnp.einsum("btd,dk->btk", x_BxTxD, k_DxK, preferred_element_type=jnp.float32) + b_K
        new_max_BxT = jnp.maximum(max_BxT, logits_BxTxK.max(-1))
        sum_BxT = sum_BxT * jnp.exp(max_BxT - new_max_BxT) + jnp.exp(logits_BxTxK - new_max_BxT[..., None]).sum(-1)
        return (new_max_BxT, sum_BxT), None

    shape = targets_BxT.shape
    (max_BxT, sum_BxT), _ = jax.lax.scan(step, (jnp.full(shape, -jnp.inf), jnp.zeros(shape)), (kernel_CxDxK, bias_CxK))
    target_cols_BxTxD = jnp.take(kernel_DxV.T, targets_BxT, axis=0).astype(x_BxTxD.dtype)
    target_logit_BxT = jnp.einsum("btd,btd->bt", x_BxTxD, target_cols_BxTxD, preferred_element_type=jnp.float32)
    if bias_V is not None:
        target_logit_BxT = target_logit_BxT + bias_V.astype(jnp.float32)[targets_BxT]
    return max_BxT + jnp.log(sum_BxT) - target_logit_BxT


def _lm_sums(model, params, batch: dict) -> dict:
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    chunk = model.cfg.logits_chunk
    if not chunk:
        return lm_sums(model.apply({"params": params}, *args), batch)
    x_BxTxD = model.apply({"params": params}, *args, return_hidden=True)
    if model.cfg.tie_embeddings:
        kernel_DxV, bias_V = params["embed"]["embedding"].T, None
    else:
        kernel_DxV, bias_V = params["lm_head"]["kernel"], params["lm_head"].get("bias")
    return weighted_sums(chunked_token_nats(x_BxTxD, kernel_DxV, bias_V, batch["targets"], chunk), batch)


def _lm_scalars(sums: dict, prefix: str) -> dict:
    rates = compression(sums)
    loss_name = "loss_bits_per_token" if prefix == "train" else "bits_per_token"
    return {f"{prefix}/{loss_name}": rates["bits_per_token"], f"{prefix}/bits_per_byte": rates["bits_per_byte"]}


NEXT_TOKEN = Objective(batch_axes={k: ("batch", "length") for k in pipeline.KEYS}, sums=_lm_sums, loss="nats",
                       count="tokens", scalars=_lm_scalars, progress=("bpb", "train/bits_per_byte"))
