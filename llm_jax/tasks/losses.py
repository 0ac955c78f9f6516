"""Next-token loss as sums (nats, target tokens, target bytes), so that accumulation over microbatches,
devices and eval batches divides once, by the true totals; bits per token and bits per byte from them.

Used by every task that predicts tokens (pretraining, SFT, DPO) and by `llm-jax eval`, through
`next_token_sums` (DPO: `next_token_nats_and_kl`), which honour model.logits_chunk everywhere.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llm_jax.data.batches import TokenBatch
from llm_jax.model.layers import softcap

LN2 = math.log(2.0)


@jax.custom_vjp
def token_nats_and_lse(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(-log p(target), log Z) in nats for every position, in float32: logsumexp(logits) - logits[target], and
    logsumexp(logits), the log of the softmax's normaliser (which the z-loss keeps near 0).

    The gradient, softmax(logits) · (g + g_Z) - onehot(target) · g, is written out as one elementwise pass:
    autodiff of the gather would build a zero (B, T, V) array and scatter into it, which costs as much as the
    matmul before it on CPU.
    """
    return _token_nats_and_lse_fwd(logits_BxTxV, targets_BxT)[0]


@jax.custom_vjp
def token_nats(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """-log p(target) in nats for every position (token_nats_and_lse without log Z)."""
    return _token_nats_fwd(logits_BxTxV, targets_BxT)[0]


def _token_nats_fwd(logits_BxTxV, targets_BxT):
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    lse_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return lse_BxT - target_BxT, (logits_BxTxV, targets_BxT, lse_BxT)


def _token_nats_grad(residuals, g_BxT, g_lse_BxT):
    logits_BxTxV, targets_BxT, lse_BxT = residuals
    vocab_V = jnp.arange(logits_BxTxV.shape[-1], dtype=targets_BxT.dtype)
    onehot_BxTxV = vocab_V == targets_BxT[..., None]
    probs_BxTxV = jnp.exp(logits_BxTxV - lse_BxT[..., None])
    return probs_BxTxV * (g_BxT + g_lse_BxT)[..., None] - onehot_BxTxV * g_BxT[..., None], None


token_nats.defvjp(_token_nats_fwd, lambda residuals, g_BxT: _token_nats_grad(residuals, g_BxT, 0.0))


def _token_nats_and_lse_fwd(logits_BxTxV, targets_BxT):
    nats_BxT, residuals = _token_nats_fwd(logits_BxTxV, targets_BxT)
    return (nats_BxT, residuals[2]), residuals


token_nats_and_lse.defvjp(_token_nats_and_lse_fwd, lambda residuals, g: _token_nats_grad(residuals, *g))


def chunked_token_nats(x_BxTxD: jax.Array, kernel_DxV: jax.Array, bias_V: jax.Array | None,
                       targets_BxT: jax.Array, chunk: int, cap: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """token_nats_and_lse of the logits softcap(x @ kernel (+ bias), cap) without materialising them: a scan over
    the C vocabulary chunks of U entries keeps a running max and sum of exponentials in float32 (the
    log-sum-exp), and each chunk's logits are recomputed in the backward pass (jax.checkpoint), so the memory is
    (B, T, U), not (B, T, V)."""
    D, V = kernel_DxV.shape
    if V % chunk:
        raise ValueError(f"model.logits_chunk={chunk} does not divide model.vocab_size={V}")
    kernel_CxDxU = kernel_DxV.astype(x_BxTxD.dtype).reshape(D, V // chunk, chunk).transpose(1, 0, 2)
    bias_CxU = (jnp.zeros(V, jnp.float32) if bias_V is None else bias_V.astype(jnp.float32)).reshape(-1, chunk)

    @jax.checkpoint
    def step(carry, chunk_params):
        max_BxT, sum_BxT = carry
        k_DxU, b_U = chunk_params
        logits_BxTxU = softcap(jnp.einsum("btd,du->btu", x_BxTxD, k_DxU, preferred_element_type=jnp.float32) + b_U,
                               cap)
        new_max_BxT = jnp.maximum(max_BxT, logits_BxTxU.max(-1))
        sum_BxT = sum_BxT * jnp.exp(max_BxT - new_max_BxT) + jnp.exp(logits_BxTxU - new_max_BxT[..., None]).sum(-1)
        return (new_max_BxT, sum_BxT), None

    shape = targets_BxT.shape
    (max_BxT, sum_BxT), _ = jax.lax.scan(step, (jnp.full(shape, -jnp.inf), jnp.zeros(shape)), (kernel_CxDxU, bias_CxU))
    target_cols_BxTxD = jnp.take(kernel_DxV.T, targets_BxT, axis=0).astype(x_BxTxD.dtype)
    target_logit_BxT = jnp.einsum("btd,btd->bt", x_BxTxD, target_cols_BxTxD, preferred_element_type=jnp.float32)
    if bias_V is not None:
        target_logit_BxT = target_logit_BxT + bias_V.astype(jnp.float32)[targets_BxT]
    lse_BxT = max_BxT + jnp.log(sum_BxT)
    return lse_BxT - softcap(target_logit_BxT, cap), lse_BxT


def chunked_kl(x_BxTxD: jax.Array, kernel_DxV: jax.Array, bias_V: jax.Array | None, y_BxTxD: jax.Array,
               ref_kernel_DxV: jax.Array, ref_bias_V: jax.Array | None, chunk: int, cap: float = 0.0) -> jax.Array:
    """KL(p || q) in nats at every position, p = softmax(softcap(x @ kernel + bias, cap)), q = the same of
    y @ ref_kernel + ref_bias, over C vocabulary chunks of U entries: with a = p's logits and b = q's,
    KL = sum_v exp(a_v - lse_a) (a_v - b_v) - lse_a + lse_b, each sum kept online with its running max, so the
    memory is (B, T, U). Not differentiated (a metric)."""
    D, V = kernel_DxV.shape
    as_chunks = lambda k, dtype: k.astype(dtype).reshape(D, V // chunk, chunk).transpose(1, 0, 2)
    bias_chunks = lambda b: (jnp.zeros(V, jnp.float32) if b is None else b.astype(jnp.float32)).reshape(-1, chunk)

    def step(carry, chunk_params):
        max_a, sum_a, weighted, max_b, sum_b = carry
        k_DxU, b_U, rk_DxU, rb_U = chunk_params
        a_BxTxU = softcap(jnp.einsum("btd,du->btu", x_BxTxD, k_DxU, preferred_element_type=jnp.float32) + b_U, cap)
        b_BxTxU = softcap(jnp.einsum("btd,du->btu", y_BxTxD, rk_DxU, preferred_element_type=jnp.float32) + rb_U, cap)
        new_max_a, new_max_b = jnp.maximum(max_a, a_BxTxU.max(-1)), jnp.maximum(max_b, b_BxTxU.max(-1))
        exp_a = jnp.exp(a_BxTxU - new_max_a[..., None])
        rescale_a = jnp.exp(max_a - new_max_a)
        sum_a = sum_a * rescale_a + exp_a.sum(-1)
        weighted = weighted * rescale_a + (exp_a * (a_BxTxU - b_BxTxU)).sum(-1)
        sum_b = sum_b * jnp.exp(max_b - new_max_b) + jnp.exp(b_BxTxU - new_max_b[..., None]).sum(-1)
        return (new_max_a, sum_a, weighted, new_max_b, sum_b), None

    shape = x_BxTxD.shape[:-1]
    start = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape), jnp.full(shape, -jnp.inf), jnp.zeros(shape))
    chunks = (as_chunks(kernel_DxV, x_BxTxD.dtype), bias_chunks(bias_V), as_chunks(ref_kernel_DxV, y_BxTxD.dtype),
              bias_chunks(ref_bias_V))
    (max_a, sum_a, weighted, max_b, sum_b), _ = jax.lax.scan(step, start, jax.lax.stop_gradient(chunks))
    return weighted / sum_a - (max_a + jnp.log(sum_a)) + (max_b + jnp.log(sum_b))


def output_layer(model, params) -> tuple[jax.Array, jax.Array | None]:
    """(kernel (D, V), bias (V,) or None) of a language model's output layer."""
    if model.cfg.tie_embeddings:
        return params["embed"]["embedding"].T, None
    return params["lm_head"]["kernel"], params["lm_head"].get("bias")


def next_token_nats_and_lse(model, params, batch: TokenBatch) -> tuple[jax.Array, jax.Array]:
    """(-log p(target), log Z) of every position under a language model, through vocabulary chunks when
    model.cfg.logits_chunk is set (never holding (B, T, V) float32 logits)."""
    args = (batch.inputs, batch.positions, batch.segment_ids)
    chunk = model.cfg.logits_chunk
    if not chunk:
        return token_nats_and_lse(model.apply({"params": params}, *args), batch.targets)
    x_BxTxD = model.apply({"params": params}, *args, return_hidden=True)
    return chunked_token_nats(x_BxTxD, *output_layer(model, params), batch.targets, chunk, model.cfg.logit_softcap)


def next_token_nats(model, params, batch: TokenBatch) -> jax.Array:
    """-log p(target) of every position under a language model (next_token_nats_and_lse)."""
    return next_token_nats_and_lse(model, params, batch)[0]


def next_token_nats_and_kl(model, params, ref_params, batch: TokenBatch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(-log p(target), -log q(target), KL(p || q)) at every position, p the model under params, q under
    ref_params (not differentiated), through vocabulary chunks when model.cfg.logits_chunk is set."""
    args = (batch.inputs, batch.positions, batch.segment_ids)
    chunk, ref_params = model.cfg.logits_chunk, jax.lax.stop_gradient(ref_params)
    if not chunk:
        a_BxTxV = model.apply({"params": params}, *args).astype(jnp.float32)
        b_BxTxV = model.apply({"params": ref_params}, *args).astype(jnp.float32)
        log_p, log_q = jax.nn.log_softmax(jax.lax.stop_gradient(a_BxTxV)), jax.nn.log_softmax(b_BxTxV)
        kl_BxT = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
        return token_nats(a_BxTxV, batch.targets), token_nats(b_BxTxV, batch.targets), kl_BxT
    x_BxTxD = model.apply({"params": params}, *args, return_hidden=True)
    y_BxTxD = model.apply({"params": ref_params}, *args, return_hidden=True)
    layer, ref_layer, cap = output_layer(model, params), output_layer(model, ref_params), model.cfg.logit_softcap
    kl_BxT = chunked_kl(jax.lax.stop_gradient(x_BxTxD), *jax.lax.stop_gradient(layer), y_BxTxD, *ref_layer, chunk,
                        cap)
    return (chunked_token_nats(x_BxTxD, *layer, batch.targets, chunk, cap)[0],
            chunked_token_nats(y_BxTxD, *ref_layer, batch.targets, chunk, cap)[0], kl_BxT)


def next_token_sums(model, params, batch: TokenBatch, z_loss: float = 0.0) -> dict[str, jax.Array]:
    """weighted_sums, and the training objective: the nats plus z_loss · (log Z)² per weighted target (PaLM's
    z-loss; the reported bits stay the nats)."""
    nats_BxT, lse_BxT = next_token_nats_and_lse(model, params, batch)
    sums = weighted_sums(nats_BxT, batch)
    if not z_loss:
        return {**sums, "objective": sums["nats"]}
    return {**sums, "objective": sums["nats"] + z_loss * jnp.sum(jnp.square(lse_BxT) * batch.weights)}


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


def policy_logprobs(model, params, batch, temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    """(log π(target), entropy of π) at every position, π the model's next-token distribution at `temperature`
    (the one its answers were sampled from, so that log-probabilities of sampled tokens are those of the
    sampler). From the full logits: RL's tasks refuse model.logits_chunk."""
    logits_BxTxV = model.apply({"params": params}, batch.inputs, batch.positions, batch.segment_ids)
    if temperature != 1.0:
        logits_BxTxV = logits_BxTxV / temperature
    log_probs_BxTxV = jax.nn.log_softmax(logits_BxTxV)
    entropy_BxT = -jnp.sum(jnp.exp(log_probs_BxTxV) * log_probs_BxTxV, axis=-1)
    return -token_nats(logits_BxTxV, batch.targets), entropy_BxT
