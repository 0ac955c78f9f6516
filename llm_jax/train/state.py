"""The train state, created directly in its sharded layout (jit of init with out_shardings)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct

from llm_jax.parallel import sharding


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # base key data; per-step randomness derives as fold_in(rng, step) (train/step.py: dropout)
    skipped: jax.Array  # updates skipped for a non-finite loss, gradient or update
    # The step count the learning-rate schedule is planned for (optim.lr_factor; 0: not planned yet): train.steps,
    # or what a time budget estimated. State, not a compile-time constant, so that planning needs no recompile.
    planned_steps: jax.Array


def _dummy_inputs(batch: int, seq_len: int):
    tokens = jnp.zeros((batch, seq_len), jnp.int32)
    return tokens, tokens, jnp.ones((batch, seq_len), jnp.int32)


def _keep_all(params):
    return params


def _boxed_init(model: nn.Module, optimizer: optax.GradientTransformation, seq_len: int, select):
    def init(rng):
        params = select(model.init(rng, *_dummy_inputs(1, seq_len))["params"])
        # optax keeps the Partitioned boxes on its moments, so they inherit the parameters' logical names.
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          rng=jax.random.key_data(rng), skipped=jnp.zeros((), jnp.int32),
                          planned_steps=jnp.zeros((), jnp.int32))
    return init


def abstract_params(model, mesh, seq_len: int = 8):
    """Shapes, dtypes and shardings (by the logical rules on `mesh`) of the model's params, allocating nothing;
    every dimension checked against the mesh (a restore target for inference and init_from)."""
    boxed = jax.eval_shape(lambda r: model.init(r, *_dummy_inputs(1, seq_len))["params"], jax.random.key(0))
    return _checked_layout(boxed, mesh, params_of=lambda tree: tree)


def abstract_state(model, optimizer, mesh, seq_len: int, select=_keep_all):
    """Shapes, dtypes and shardings of the whole train state on `mesh`, allocating nothing: the layout
    create_state fills, a restore target, a step compiled ahead of time. select(params) -> the params that
    train (train/peft.trainable: the adapters of a peft run)."""
    boxed = jax.eval_shape(_boxed_init(model, optimizer, seq_len, select), jax.random.key(0))
    return _checked_layout(boxed, mesh, params_of=lambda state: state.params)


def _checked_layout(boxed, mesh, params_of):
    """The abstract (unboxed) tree laid out by its logical names on `mesh`. Every parameter dimension is
    checked against the mesh first, so that one it cannot split is a one-line MeshError naming the parameter
    before anything compiles (the optimizer's moments have the parameters' shapes)."""
    # A partitioned optimizer (Muon's) masks the other group's leaves inside their boxes: no array, no sharding.
    masked = lambda x: isinstance(x, nn.meta.AxisMetadata) and isinstance(x.value, optax.MaskedNode)  # noqa: E731
    boxed = jax.tree.map(lambda x: x.value if masked(x) else x, boxed,
                         is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    specs, abstract = nn.get_partition_spec(boxed), nn.unbox(boxed)
    sharding.check_tree_divisible(params_of(specs), params_of(abstract), mesh, prefix="parameter ")
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                        sharding.tree_shardings(specs, mesh))


def create_state(model, optimizer, layout, seq_len: int, rng, select=_keep_all) -> tuple[TrainState, Any]:
    """Initialises the train state directly in `layout` (abstract_state's, with the same `select`); returns it
    and its shardings."""
    shardings = jax.tree.map(lambda a: a.sharding, layout)
    mesh = jax.tree.leaves(layout)[0].sharding.mesh
    boxed_init = _boxed_init(model, optimizer, seq_len, select)
    return sharding.jit_on_mesh(lambda r: nn.unbox(boxed_init(r)), mesh, out_shardings=shardings)(rng), shardings


def with_planned_steps(state: TrainState, planned_steps: int) -> TrainState:
    """The state with the schedule planned for `planned_steps` (the same value on every process)."""
    sharding_ = state.planned_steps.sharding
    value = jax.make_array_from_callback((), sharding_, lambda _: np.asarray(planned_steps, np.int32))
    return state.replace(planned_steps=value)
