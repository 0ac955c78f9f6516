"""Next-token loss, kept as sums (nats, target tokens, target bytes) so that accumulation over
microbatches, devices and eval batches divides once, by the true totals."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LN2 = math.log(2.0)


def token_nats(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """-log p(target) in nats for every position, computed in float32."""
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]


def lm_sums(logits_BxTxV: jax.Array, batch: dict) -> dict[str, jax.Array]:
    """Sums over the batch: nats of weighted targets, their count and their UTF-8 bytes."""
    nats_BxT = token_nats(logits_BxTxV, batch["targets"])
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
