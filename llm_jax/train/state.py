"""The train state, created directly in its sharded layout (jit of init with out_shardings)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct

from llm_jax.parallel import sharding


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # base key data; per-step randomness would derive as fold_in(rng, step)
    skipped: jax.Array  # updates skipped for a non-finite loss, gradient or update


def _dummy_inputs(batch: int, seq_len: int):
    tokens = jnp.zeros((batch, seq_len), jnp.int32)
    return tokens, tokens, jnp.ones((batch, seq_len), jnp.int32)


def _boxed_init(model: nn.Module, optimizer: optax.GradientTransformation, seq_len: int):
    def init(rng):
        params = model.init(rng, *_dummy_inputs(1, seq_len))["params"]
        # optax keeps the Partitioned boxes on its moments, so they inherit the parameters' logical names.
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          rng=jax.random.key_data(rng), skipped=jnp.zeros((), jnp.int32))
    return init


def _laid_out(abstract, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def abstract_params(model, mesh, seq_len: int = 8):
    """Shapes, dtypes and shardings (by the logical rules on `mesh`) of the model's params, allocating nothing."""
    boxed = jax.eval_shape(lambda r: model.init(r, *_dummy_inputs(1, seq_len))["params"], jax.random.key(0))
    return _laid_out(nn.unbox(boxed), sharding.tree_shardings(nn.get_partition_spec(boxed), mesh))


def abstract_state(model, optimizer, mesh, seq_len: int):
    """Shapes, dtypes and shardings of the whole train state on `mesh`, every dimension checked against it,
    allocating nothing (a restore target; a step compiled ahead of time)."""
    specs, abstract = _checked_specs(model, optimizer, mesh, seq_len)
    return _laid_out(abstract, sharding.tree_shardings(specs, mesh))


def logical_specs(model, optimizer, seq_len: int):
    """Logical PartitionSpecs and abstract shapes of the (unboxed) train state, without allocating it."""
    abstract = jax.eval_shape(_boxed_init(model, optimizer, seq_len), jax.random.key(0))
    return nn.get_partition_spec(abstract), nn.unbox(abstract)


def check_fits(model, optimizer, mesh, seq_len: int):
    """Every parameter dimension against the mesh, before anything compiles; returns the logical specs."""
    return _checked_specs(model, optimizer, mesh, seq_len)[0]


def _checked_specs(model, optimizer, mesh, seq_len: int):
    specs, abstract = logical_specs(model, optimizer, seq_len)
    sharding.check_tree_divisible(specs.params, abstract.params, mesh, prefix="parameter ")
    return specs, abstract


def create_state(model, optimizer, mesh, seq_len: int, rng) -> tuple[TrainState, Any]:
    """Initialises the train state directly in its sharded layout; returns it and its shardings."""
    shardings = sharding.tree_shardings(check_fits(model, optimizer, mesh, seq_len), mesh)
    boxed_init = _boxed_init(model, optimizer, seq_len)
    state = sharding.jit_on_mesh(lambda r: nn.unbox(boxed_init(r)), mesh, out_shardings=shardings)(rng)
    return state, shardings
