"""Pure train and eval steps, jitted with explicit shardings.

train_step(state, batch) -> (state, metrics). Batch leaves have shape (M, B/M, T): M microbatches whose
gradients of the summed loss are accumulated, then divided once by the total number of target tokens,
so accumulation gives exactly the gradient of the big batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from llm_jax import losses, sharding
from llm_jax.data.pipeline import KEYS as BATCH_KEYS
from llm_jax.state import TrainState


def _sums_and_grads(model, params, microbatch):
    def loss_fn(p):
        logits = model.apply({"params": p}, microbatch["inputs"], microbatch["positions"],
                             microbatch["segment_ids"])
        sums = losses.lm_sums(logits, microbatch)
        return sums["nats"], sums
    (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return sums, grads


def train_step(state: TrainState, batch: dict, *, model, optimizer, lr_schedule):
    def accumulate(carry, microbatch):
        sums, grads = _sums_and_grads(model, state.params, microbatch)
        return jax.tree.map(jnp.add, carry, (sums, grads)), None

    zero_sums = {k: jnp.zeros((), jnp.float32) for k in ("nats", "tokens", "bytes")}
    zero_grads = jax.tree.map(jnp.zeros_like, state.params)
    (sums, grads), _ = jax.lax.scan(accumulate, (zero_sums, zero_grads), batch)
    grads = jax.tree.map(lambda g: g / jnp.maximum(sums["tokens"], 1.0), grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(params)
    # One NaN/Inf anywhere reaches these norms; such an update is dropped, so the state stays the last good one.
    finite = jnp.isfinite(sums["nats"]) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    skipped = state.skipped + (~finite).astype(jnp.int32)
    rates = losses.compression(sums)
    metrics = {
        "train/loss_bits_per_token": rates["bits_per_token"],
        "train/bits_per_byte": rates["bits_per_byte"],
        "optim/learning_rate": lr_schedule(state.step),
        "optim/grad_norm": grad_norm,
        "optim/param_norm": optax.tree.norm(keep_old(params, state.params)),
        "optim/skipped_steps": skipped,
        "train/finite": finite,
    }
    new_state = TrainState(step=state.step + 1, params=keep_old(params, state.params),
                           opt_state=keep_old(opt_state, state.opt_state), rng=state.rng, skipped=skipped)
    return new_state, metrics


def eval_step(params, batch: dict, *, model) -> dict:
    logits = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"])
    return losses.lm_sums(logits, batch)


def jit_train_step(model, optimizer, lr_schedule, mesh, state_shardings):
    batch_sharding = sharding.logical_sharding(mesh, "microbatch", "batch", "length")
    fn = lambda s, b: train_step(s, b, model=model, optimizer=optimizer, lr_schedule=lr_schedule)
    return sharding.jit_on_mesh(
        fn, mesh, in_shardings=(state_shardings, {k: batch_sharding for k in BATCH_KEYS}),
        out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))


def jit_eval_step(model, mesh, param_shardings):
    batch_sharding = sharding.logical_sharding(mesh, "batch", "length")
    return sharding.jit_on_mesh(
        lambda p, b: eval_step(p, b, model=model), mesh,
        in_shardings=(param_shardings, {k: batch_sharding for k in BATCH_KEYS}),
        out_shardings=sharding.replicated(mesh))
