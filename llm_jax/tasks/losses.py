"""Next-token loss as sums (nats, target tokens, target bytes), so that accumulation over microbatches,
devices and eval batches divides once, by the true totals; bits per token and bits per byte from them.

Used by every task that predicts tokens (pretraining, SFT) and by `llm-jax eval`, through
`next_token_sums`, which honours model.logits_chunk everywhere.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llm_jax.data.batches import TokenBatch

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


def chunked_token_nats(x_BxTxD: jax.Array, kernel_DxV: jax.Array, bias_V: jax.Array | None,
                       targets_BxT: jax.Array, chunk: int) -> jax.Array:
    """token_nats of the logits x @ kernel (+ bias) without materialising them: a scan over the C vocabulary
    chunks of U entries keeps a running max and sum of exponentials in float32 (the log-sum-exp), and each
    chunk's logits are recomputed in the backward pass (jax.checkpoint), so the memory is (B, T, U), not
    (B, T, V)."""
    D, V = kernel_DxV.shape
    if V % chunk:
        raise ValueError(f"model.logits_chunk={chunk} does not divide model.vocab_size={V}")
    kernel_CxDxU = kernel_DxV.astype(x_BxTxD.dtype).reshape(D, V // chunk, chunk).transpose(1, 0, 2)
    bias_CxU = (jnp.zeros(V, jnp.float32) if bias_V is None else bias_V.astype(jnp.float32)).reshape(-1, chunk)

    @jax.checkpoint
    def step(carry, chunk_params):
        max_BxT, sum_BxT = carry
        k_DxU, b_U = chunk_params
        logits_BxTxU = jnp.einsum("btd,du->btu", x_BxTxD, k_DxU, preferred_element_type=jnp.float32) + b_U
        new_max_BxT = jnp.maximum(max_BxT, logits_BxTxU.max(-1))
        sum_BxT = sum_BxT * jnp.exp(max_BxT - new_max_BxT) + jnp.exp(logits_BxTxU - new_max_BxT[..., None]).sum(-1)
        return (new_max_BxT, sum_BxT), None

    shape = targets_BxT.shape
    (max_BxT, sum_BxT), _ = jax.lax.scan(step, (jnp.full(shape, -jnp.inf), jnp.zeros(shape)), (kernel_CxDxU, bias_CxU))
    target_cols_BxTxD = jnp.take(kernel_DxV.T, targets_BxT, axis=0).astype(x_BxTxD.dtype)
    target_logit_BxT = jnp.einsum("btd,btd->bt", x_BxTxD, target_cols_BxTxD, preferred_element_type=jnp.float32)
    if bias_V is not None:
        target_logit_BxT = target_logit_BxT + bias_V.astype(jnp.float32)[targets_BxT]
    return max_BxT + jnp.log(sum_BxT) - target_logit_BxT


def next_token_nats(model, params, batch: TokenBatch) -> jax.Array:
    """-log p(target) of every position under a language model, through vocabulary chunks when
    model.cfg.logits_chunk is set (never holding (B, T, V) float32 logits)."""
    args = (batch.inputs, batch.positions, batch.segment_ids)
    chunk = model.cfg.logits_chunk
    if not chunk:
        return token_nats(model.apply({"params": params}, *args), batch.targets)
    x_BxTxD = model.apply({"params": params}, *args, return_hidden=True)
    if model.cfg.tie_embeddings:
        kernel_DxV, bias_V = params["embed"]["embedding"].T, None
    else:
        kernel_DxV, bias_V = params["lm_head"]["kernel"], params["lm_head"].get("bias")
    return chunked_token_nats(x_BxTxD, kernel_DxV, bias_V, batch.targets, chunk)


def next_token_sums(model, params, batch: TokenBatch) -> dict[str, jax.Array]:
    return weighted_sums(next_token_nats(model, params, batch), batch)


def weighted_sums(nats_BxT: jax.Array, batch: TokenBatch) -> dict[str, jax.Array]:
    """Sums over the batch: nats of the weighted targets, their count and their UTF-8 bytes."""
    weights_BxT = batch.weights.astype(jnp.float32)
    return {"nats": jnp.sum(nats_BxT * weights_BxT), "tokens": jnp.sum(weights_BxT),
            "bytes": jnp.sum(batch.target_bytes.astype(jnp.float32) * weights_BxT)}


def compression_rates(sums: dict) -> dict:
    """Bits per token and bits per byte from summed nats (works on jax and Python numbers)."""
    tokens = jnp.maximum(sums["tokens"], 1.0)
    bytes_ = jnp.maximum(sums["bytes"], 1.0)
    return {"bits_per_token": sums["nats"] / tokens / LN2, "bits_per_byte": sums["nats"] / bytes_ / LN2}
