"""Pure train and eval steps, jitted with explicit shardings.

train_step(state, batch) -> (state, metrics). Batch leaves have shape (M, B/M, ...): M microbatches whose
gradients of the summed loss are accumulated, then divided once by the total count (target tokens, pairs),
so accumulation gives exactly the gradient of the big batch. What is summed and reported comes from the
Objective (losses.NEXT_TOKEN for pretraining and SFT, reward.objective for a reward model).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from llm_jax import sharding
from llm_jax.losses import Objective
from llm_jax.state import TrainState


def train_step(state: TrainState, batch: dict, *, model, optimizer, lr_schedule, objective: Objective):
    def sums_and_grads(microbatch):
        def loss_fn(p):
            sums = objective.sums(model, p, microbatch)
            return sums[objective.loss], sums
        (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return sums, grads

    def accumulate(carry, microbatch):
        return jax.tree.map(jnp.add, carry, sums_and_grads(microbatch)), None

    first = jax.tree.map(lambda x: x[0], batch)
    zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(sums_and_grads, first)[0])
    zero_grads = jax.tree.map(jnp.zeros_like, state.params)
    (sums, grads), _ = jax.lax.scan(accumulate, (zero_sums, zero_grads), batch)
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums[objective.count], 1.0), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(params)
    # One NaN/Inf anywhere reaches these norms; such an update is dropped, so the state stays the last good one.
    finite = jnp.isfinite(sums[objective.loss]) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    skipped = state.skipped + (~finite).astype(jnp.int32)
    metrics = {
        **objective.scalars(sums, "train"),
        "optim/learning_rate": lr_schedule(state.step),
        "optim/grad_norm": grad_norm,
        "optim/param_norm": optax.tree.norm(keep_old(params, state.params)),
        "optim/skipped_steps": skipped,
        "train/finite": finite,
    }
    new_state = TrainState(step=state.step + 1, params=keep_old(params, state.params),
                           opt_state=keep_old(opt_state, state.opt_state), rng=state.rng, skipped=skipped)
    return new_state, metrics


def batch_shardings(mesh, objective: Objective, microbatched: bool) -> dict:
    """The sharding of each batch entry: its logical axes, under a leading microbatch axis for training."""
    lead = ("microbatch",) if microbatched else ()
    return {k: sharding.logical_sharding(mesh, *lead, *axes) for k, axes in objective.batch_axes.items()}


def jit_train_step(model, optimizer, lr_schedule, mesh, state_shardings, objective: Objective):
    fn = lambda s, b: train_step(s, b, model=model, optimizer=optimizer, lr_schedule=lr_schedule,
                                 objective=objective)
    return sharding.jit_on_mesh(
        fn, mesh, in_shardings=(state_shardings, batch_shardings(mesh, objective, microbatched=True)),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def jit_eval_step(model, mesh, param_shardings, objective: Objective):
    """(params, batch) -> the objective's sums over the batch."""
    return sharding.jit_on_mesh(
        lambda p, b: objective.sums(model, p, b), mesh,
        in_shardings=(param_shardings, batch_shardings(mesh, objective, microbatched=False)),
        out_shardings=sharding.replicated(mesh))
