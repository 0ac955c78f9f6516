"""The optimizer (AdamW, or Muon for the blocks' matrices beside AdamW for the rest) after global-norm
clipping, and the learning-rate schedule.

The optimizer's updates are at each group's peak rate; the train step scales them by `lr_factor(step,
planned_steps)`, the schedule as a fraction of the peak. The planned step count is part of the train state,
not of the compiled step, so a wall-clock budget (train.time_budget_s) can plan the run's length after its
first steps are measured, without compiling again.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from llm_jax.config import OptimConfig

# Only matmul weights and embeddings decay; norm scales and biases would be pulled towards zero for nothing.
_DECAYED = ("kernel", "embedding")
# The blocks' matrices Muon orthogonalises, by module name: (input axes, output axes) of the kernel, counted
# from its first non-layer axis. q, k, v: (D) -> (heads, H); o: (heads, H) -> (D); the MLP's: 2-D. Everything
# else (embeddings, output layer, reward and value heads, norms, biases) stays with AdamW, as in Muon's recipe.
_MUON_AXES = {"q": ((0,), (1, 2)), "k": ((0,), (1, 2)), "v": ((0,), (1, 2)), "o": ((0, 1), (2,)),
              "up": ((0,), (1,)), "gate": ((0,), (1,)), "down": ((0,), (1,))}


def lr_factor(cfg: OptimConfig, step: jax.Array, planned_steps: jax.Array) -> jax.Array:
    """The learning rate at `step` (0-based) as a fraction of the peak, for a run planned to last planned_steps
    (0: not planned yet, as while a time budget measures its first steps: the peak after warmup).

    Linear warmup from 0 over optim.warmup_steps; then cosine decay to min_lr_ratio at the planned end, or
    (wsd) the peak until the last decay_fraction of the steps and a linear decay to min_lr_ratio over those."""
    step, total = jnp.asarray(step, jnp.float32), jnp.asarray(planned_steps, jnp.float32)
    warmup = jnp.where(total > 0, jnp.minimum(cfg.warmup_steps, jnp.maximum(total - 1, 0)), cfg.warmup_steps)
    warm = jnp.where(warmup > 0, jnp.minimum(step / jnp.maximum(warmup, 1.0), 1.0), 1.0)
    floor = cfg.min_lr_ratio
    # Decays end at the last step (total - 1): the run's last update is made at the floor.
    if cfg.schedule == "cosine":
        progress = jnp.clip((step - warmup) / jnp.maximum(total - 1 - warmup, 1.0), 0.0, 1.0)
        decayed = floor + (1 - floor) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
    else:
        decay_start = total - jnp.maximum(jnp.round(cfg.decay_fraction * total), 1.0)
        progress = jnp.clip((step - decay_start) / jnp.maximum(total - 1 - decay_start, 1.0), 0.0, 1.0)
        decayed = 1 - (1 - floor) * progress
    return jnp.where(step < warmup, warm, jnp.where(total > 0, decayed, 1.0))


def decay_mask(params):
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) in _DECAYED, params)


def _adamw(cfg: OptimConfig) -> optax.GradientTransformation:
    return optax.chain(optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
                       optax.add_decayed_weights(cfg.weight_decay, decay_mask), optax.scale(-cfg.learning_rate))


def muon_axes(params):
    """Muon's dimension numbers for each parameter it trains (None: AdamW's). Stacked layers (scan_layers)
    lead with a layer axis, which Muon treats as a batch of matrices."""
    def axes(path, leaf):
        keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]  # (past a logical-axis box's .value)
        if not keys or keys[-1] != "kernel" or len(keys) < 2 or keys[-2] not in _MUON_AXES:
            return None
        inputs, outputs = _MUON_AXES[keys[-2]]
        lead = leaf.ndim - (len(inputs) + len(outputs))
        return MuonDimensionNumbers(tuple(a + lead for a in inputs), tuple(a + lead for a in outputs))
    return jax.tree_util.tree_map_with_path(axes, params)


def _scale_by_shape() -> optax.GradientTransformation:
    """Muon's orthogonalised update times sqrt(max(1, fan_out / fan_in)) (Keller Jordan's Muon), so that one
    learning rate suits every matrix shape."""
    def scale(update, axes):
        fan_in, fan_out = (math.prod(update.shape[a] for a in group) for group in axes)
        return update * math.sqrt(max(1.0, fan_out / fan_in))

    def update_fn(updates, state, params=None):
        return jax.tree.map(scale, updates, muon_axes(updates), is_leaf=lambda x: isinstance(x, jax.Array)), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _muon(cfg: OptimConfig) -> optax.GradientTransformation:
    """Muon at muon_learning_rate with decoupled weight decay; AdamW for the parameters muon_axes leaves out."""
    def labels(params):
        return jax.tree.map(lambda a: "adam" if a is None else "muon", muon_axes(params),
                            is_leaf=lambda a: a is None or isinstance(a, MuonDimensionNumbers))
    # optax.partition hands the muon group the full tree with the other leaves masked (empty nodes), which
    # muon_axes maps to empty nodes again, so the dimension numbers match the group's tree.
    muon = optax.chain(scale_by_muon(beta=cfg.muon_momentum, weight_dimension_numbers=muon_axes),
                       _scale_by_shape(),
                       optax.add_decayed_weights(cfg.weight_decay), optax.scale(-cfg.muon_learning_rate))
    return optax.partition({"muon": muon, "adam": _adamw(cfg)}, labels)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """Updates at the peak learning rate (the train step scales them by lr_factor)."""
    inner = _muon(cfg) if cfg.optimizer == "muon" else _adamw(cfg)
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), inner) if cfg.grad_clip > 0 else inner
