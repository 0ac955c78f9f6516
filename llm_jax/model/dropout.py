"""Dropout in train steps only: a module drops where its call was given a "dropout" key (train/step.py gives
every train step one, folded from the state's key and the step), so evaluation, decoding and exports never do."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn


def dropout(module: nn.Module, x, rate: float):
    """x with each element zeroed with probability `rate` and the rest scaled by 1/(1-rate) (inverted dropout),
    where `module`'s call has a "dropout" key; x unchanged otherwise."""
    if not rate or not module.has_rng("dropout"):
        return x
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
