"""Causal self-attention over blocks of keys with an online softmax (flash attention's algorithm), for long
sequences on CPU.

`attention.attend`'s einsum path writes the (B, K, G, T, T) scores out, and XLA:CPU then makes several
elementwise passes over them (mask, max, exp, sum, their gradients) in memory: at T = 512 that is 2 GiB of
scratch for pretrain_tiny's step, and the passes, not the matmuls, dominate the step. Here a query block
meets one key block at a time; its scores live only inside the loop body, small enough to stay in cache,
and the softmax is carried as a running max and sum. Key blocks wholly after a query block are never
visited, which halves the matmuls. The backward pass (a custom_vjp) recomputes each block's probabilities
from the saved log-sum-exp, so neither pass keeps anything of size T x T: memory is linear in T.

The mask is not taken as an array (it would be T x T): query i attends to key j when j <= i and both have the
same segment id, exactly `attention.causal_segment_mask(segment_ids)`. Queries and keys are the same tokens
(training and prefill without a cache); decoding with a KV cache keeps the einsum path.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_NEG = jnp.finfo(jnp.float32).min


def blocked_attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, block_size: int = 256):
    """Softmax attention of N query heads over K shared KV heads (query head n reads KV head n // (N // K)),
    causal within each segment; equal to `attend(q, k, v, causal_segment_mask(segment_ids), "einsum")`.

    T need not divide by block_size: the tail is padded with a segment id (-1) no real token has.
    """
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxTxKxH.shape[2]
    block = min(block_size, T)
    pad = -T % block
    q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
    if pad:
        widths = ((0, 0), (0, pad), (0, 0), (0, 0))
        q_BxTxKxGxH = jnp.pad(q_BxTxKxGxH, widths + ((0, 0),))
        k_BxTxKxH, v_BxTxKxH = jnp.pad(k_BxTxKxH, widths), jnp.pad(v_BxTxKxH, widths)
        segment_ids_BxT = jnp.pad(segment_ids_BxT, ((0, 0), (0, pad)), constant_values=-1)
    out = _attention(q_BxTxKxGxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT.astype(jnp.int32), block)
    return out[:, :T].reshape(B, T, N, H)


def _block(x, i, block):
    """Block i (of `block` positions) of x along its axis 1."""
    return jax.lax.dynamic_slice_in_dim(x, i * block, block, axis=1)


def _scores(q_i, k_j, seg_q, seg_k, i, j, block):
    """Scaled scores (B, K, G, bq, bk) of query block i against key block j and where they are allowed."""
    s = jnp.einsum("bqkgh,bskh->bkgqs", q_i, k_j, preferred_element_type=jnp.float32)
    s = s / jnp.sqrt(jnp.float32(q_i.shape[-1]))
    pos_q, pos_k = i * block + jnp.arange(block), j * block + jnp.arange(block)
    allowed = (seg_q[:, :, None] == seg_k[:, None, :]) & (pos_q[:, None] >= pos_k[None, :])
    return s, allowed[:, None, None]


def _forward_block(q, k, v, seg, i, block):
    """Output (B, K, G, bq, H) of query block i and its log-sum-exp (B, K, G, bq), over key blocks 0..i."""
    q_i, seg_q = _block(q, i, block), _block(seg, i, block)
    B, _, K, G, H = q.shape

    def step(j, carry):
        m, l, acc = carry
        s, allowed = _scores(q_i, _block(k, j, block), seg_q, _block(seg, j, block), i, j, block)
        m_new = jnp.maximum(m, jnp.max(jnp.where(allowed, s, _NEG), axis=-1))
        p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        acc = alpha[..., None] * acc + jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), _block(v, j, block),
                                                  preferred_element_type=jnp.float32)
        return m_new, alpha * l + jnp.sum(p, axis=-1), acc

    init = (jnp.full((B, K, G, block), _NEG), jnp.zeros((B, K, G, block)), jnp.zeros((B, K, G, block, H)))
    m, l, acc = jax.lax.fori_loop(0, i + 1, step, init)  # every row has its own key, so l > 0
    return acc / l[..., None], m + jnp.log(l)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, seg, block):
    return _forward(q, k, v, seg, block)[0]


def _forward(q, k, v, seg, block):
    """Output (B, T, K, G, H) and log-sum-exp (B, K, G, T)."""
    B, T, K, G, H = q.shape
    out, lse = jax.lax.map(lambda i: _forward_block(q, k, v, seg, i, block), jnp.arange(T // block))
    out = out.transpose(1, 0, 4, 2, 3, 5).reshape(B, T, K, G, H).astype(q.dtype)
    return out, lse.transpose(1, 2, 3, 0, 4).reshape(B, K, G, T)


def _attention_fwd(q, k, v, seg, block):
    out, lse = _forward(q, k, v, seg, block)
    return out, (q, k, v, seg, out, lse)


def _attention_bwd(block, residuals, d_out):
    """Flash attention 2's backward: for each key block, the query blocks at or after it, with the
    probabilities recomputed from the log-sum-exp; dq accumulates across key blocks."""
    q, k, v, seg, out, lse = residuals
    T = q.shape[1]
    scale = 1 / jnp.sqrt(jnp.float32(q.shape[-1]))
    delta = jnp.einsum("btkgh,btkgh->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def key_block(dq, j):
        k_j, v_j, seg_k = _block(k, j, block), _block(v, j, block), _block(seg, j, block)

        def query_block(i, carry):
            dk, dv, dq = carry
            q_i, do_i = _block(q, i, block), _block(d_out, i, block)
            s, allowed = _scores(q_i, k_j, _block(seg, i, block), seg_k, i, j, block)
            lse_i, delta_i = (jax.lax.dynamic_slice_in_dim(a, i * block, block, axis=3) for a in (lse, delta))
            p = jnp.where(allowed, jnp.exp(s - lse_i[..., None]), 0.0)
            dv = dv + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(do_i.dtype), do_i, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bqkgh,bskh->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta_i[..., None]) * scale).astype(q.dtype)
            dk = dk + jnp.einsum("bkgqs,bqkgh->bskh", ds, q_i, preferred_element_type=jnp.float32)
            dq_i = jnp.einsum("bkgqs,bskh->bqkgh", ds, k_j, preferred_element_type=jnp.float32)
            return dk, dv, jax.lax.dynamic_update_slice_in_dim(dq, _block(dq, i, block) + dq_i, i * block, axis=1)

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        dk, dv, dq = jax.lax.fori_loop(j, T // block, query_block, (zeros, zeros, dq))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(T // block))
    B, _, K, H = k.shape
    dk, dv = (a.transpose(1, 0, 2, 3, 4).reshape(B, T, K, H).astype(k.dtype) for a in (dk, dv))
    return dq.astype(q.dtype), dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
