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


def _lm_sums(model, params, batch: dict) -> dict:
    logits_BxTxV = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    return lm_sums(logits_BxTxV, batch)


def _lm_scalars(sums: dict, prefix: str) -> dict:
    rates = compression(sums)
    loss_name = "loss_bits_per_token" if prefix == "train" else "bits_per_token"
    return {f"{prefix}/{loss_name}": rates["bits_per_token"], f"{prefix}/bits_per_byte": rates["bits_per_byte"]}


NEXT_TOKEN = Objective(batch_axes={k: ("batch", "length") for k in pipeline.KEYS}, sums=_lm_sums, loss="nats",
                       count="tokens", scalars=_lm_scalars, progress=("bpb", "train/bits_per_byte"))
