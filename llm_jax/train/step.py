"""Pure train and eval steps, jitted with explicit shardings.

train_step(state, batch, frozen) -> (state, metrics). Batch entries have shape (M, B/M, ...): M microbatches
whose gradients of the summed loss are accumulated, then divided once by the total count (target tokens,
pairs), so accumulation gives exactly the gradient of the big batch. What is summed and reported comes from
the run's Task (tasks/). `frozen` holds the task's frozen params by name (DPO's reference model; a peft run's
base, train/peft.py; {} for most tasks): read, never differentiated or updated, and not part of the state (so
not checkpointed).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from llm_jax.config import OptimConfig
from llm_jax.parallel import sharding
from llm_jax.tasks.base import Task
from llm_jax.train import optim, peft
from llm_jax.train.state import TrainState


class _WithDropoutKey:
    """The model, its `apply` given a "dropout" key (model.dropout and LoRA's peft.dropout: model/dropout.py)."""

    def __init__(self, model, key):
        self.model, self.key = model, key

    def apply(self, *args, **kwargs):
        return self.model.apply(*args, rngs={"dropout": self.key}, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def train_step(state: TrainState, batch, frozen: dict, *, model, optimizer, optim_cfg: OptimConfig, task: Task):
    frozen = jax.lax.stop_gradient(frozen)
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def sums_and_grads(microbatch, index):
        keyed = _WithDropoutKey(model, jax.random.fold_in(step_key, index))

        def loss_fn(p):
            sums = task.sums(keyed, peft.with_base(p, frozen), microbatch, frozen)
            return sums[task.loss], sums
        (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return sums, grads

    def accumulate(carry, indexed):
        return jax.tree.map(jnp.add, carry, sums_and_grads(*indexed)), None

    first = jax.tree.map(lambda x: x[0], batch)
    zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(sums_and_grads, first, 0)[0])
    zero_grads = jax.tree.map(jnp.zeros_like, state.params)
    n_micro = jax.tree.leaves(batch)[0].shape[0]
    (sums, grads), _ = jax.lax.scan(accumulate, (zero_sums, zero_grads), (batch, jnp.arange(n_micro)))
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums[task.count], 1.0), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    lr_factor = optim.lr_factor(optim_cfg, state.step, state.planned_steps)
    updates = jax.tree.map(lambda u: lr_factor * u, updates)
    params = optax.apply_updates(state.params, updates)
    grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(params)
    # One NaN/Inf anywhere reaches these norms; such an update is dropped, so the state stays the last good one.
    finite = jnp.isfinite(sums[task.loss]) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    skipped = state.skipped + (~finite).astype(jnp.int32)
    metrics = {
        **task.scalars(sums, "train"),
        "optim/learning_rate": optim_cfg.learning_rate * lr_factor,
        "optim/grad_norm": grad_norm,
        "optim/param_norm": optax.tree.norm(keep_old(params, state.params)),
        "optim/skipped_steps": skipped,
        "train/finite": finite,
    }
    new_state = state.replace(step=state.step + 1, params=keep_old(params, state.params),
                              opt_state=keep_old(opt_state, state.opt_state), skipped=skipped)
    return new_state, metrics


def batch_shardings(mesh, task: Task, microbatched: bool):
    """The sharding of each entry of the task's batches: its logical axes, under a leading microbatch axis
    for training."""
    return sharding.batch_shardings(mesh, task.batch_type.axes(), *(("microbatch",) if microbatched else ()))


def jit_train_step(model, optimizer, optim_cfg: OptimConfig, mesh, state_shardings, task: Task, frozen_shardings):
    """(state, batch, frozen) -> (state, metrics); frozen: the frozen params by name (Setup.frozen), laid out as
    frozen_shardings says."""
    fn = lambda s, b, f: train_step(s, b, f, model=model, optimizer=optimizer, optim_cfg=optim_cfg, task=task)
    return sharding.jit_on_mesh(
        fn, mesh, in_shardings=(state_shardings, batch_shardings(mesh, task, microbatched=True), frozen_shardings),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def jit_eval_step(model, mesh, param_shardings, task: Task, frozen_shardings):
    """(params, batch, frozen) -> the task's sums over the batch; params: the model's whole params (a peft run's
    adapters with their base, peft.with_base), laid out as param_shardings says."""
    return sharding.jit_on_mesh(
        lambda p, b, f: task.sums(model, p, b, f), mesh,
        in_shardings=(param_shardings, batch_shardings(mesh, task, microbatched=False), frozen_shardings),
        out_shardings=sharding.replicated(mesh))
