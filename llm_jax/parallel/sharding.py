"""The device mesh (data, fsdp, tensor) and THE table mapping logical axis names onto it.

Model code names axes logically ("embed", "heads", "batch", ...); only this file mentions mesh axes.
Parameters: "embed" is split over fsdp (ZeRO-3 style: gathered just before use), the wide dimensions
(heads, mlp, vocab) over tensor. Activations: "batch" over data and fsdp together, the residual stream
("act_embed") replicated so that every tensor-parallel shard sees whole tokens.
"""
from __future__ import annotations

import math

import jax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from llm_jax.config import MeshConfig
from llm_jax.errors import MeshError

MESH_AXES = ("data", "fsdp", "tensor")

RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("positions", None),
    ("microbatch", None),
    ("adapter_rank", None),  # LoRA's r: small, so replicated; A and B split like their kernel's other axes
    ("virtual", None),  # prompt and prefix tuning's virtual tokens
)
_RULE_TABLE = dict(RULES)


def mesh_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    sizes = {"data": cfg.data, "fsdp": cfg.fsdp, "tensor": cfg.tensor}
    for name, size in sizes.items():
        if size == 0 or size < -1:
            raise MeshError(f"mesh.{name}={size}: sizes must be positive, or -1 to take the remaining devices")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    described = "×".join(f"{n}={s}" for n, s in sizes.items())
    if -1 in sizes.values():
        if n_devices % fixed:
            raise MeshError(f"mesh {described}: {n_devices} devices are not divisible by {fixed}")
        sizes = {n: (n_devices // fixed if s == -1 else s) for n, s in sizes.items()}
    elif fixed != n_devices:
        raise MeshError(f"mesh {described} needs {fixed} devices but {n_devices} are available")
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    """A mesh over `devices` (default: all), with Auto axes so Linen's logical constraints propagate."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices)


def mesh_axes_for(logical_name: str | None) -> tuple[str, ...]:
    if logical_name is None:
        return ()
    if logical_name not in _RULE_TABLE:
        raise MeshError(f"logical axis {logical_name!r} has no rule in llm_jax.parallel.sharding.RULES")
    target = _RULE_TABLE[logical_name]
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def check_divisible(what: str, shape: tuple[int, ...], logical: tuple, mesh: jax.sharding.Mesh) -> None:
    """Raises a one-line MeshError when a dimension cannot be split evenly over its mesh axes."""
    for dim, (size, name) in enumerate(zip(shape, logical)):
        axes = mesh_axes_for(name)
        parts = math.prod(mesh.shape[a] for a in axes)
        if size % parts:
            split = "×".join(f"{a}={mesh.shape[a]}" for a in axes)
            raise MeshError(f"{what}: dimension {dim} ({name}={size}) cannot be split over mesh {split}")


def check_tree_divisible(logical_specs, abstract_tree, mesh, prefix: str = "") -> None:
    """Checks every leaf of a tree of logical PartitionSpecs against the matching array shapes."""
    specs = jax.tree_util.tree_leaves_with_path(logical_specs, is_leaf=lambda x: isinstance(x, P))
    shapes = jax.tree_util.tree_leaves(abstract_tree)
    for (path, spec), leaf in zip(specs, shapes):
        names = tuple(spec) + (None,) * (leaf.ndim - len(spec))
        check_divisible(prefix + jax.tree_util.keystr(path, simple=True, separator="/"), leaf.shape, names, mesh)


def logical_sharding(mesh: jax.sharding.Mesh, *names: str | None) -> NamedSharding:
    return nn.logical_to_mesh_sharding(P(*names), mesh, RULES)


def _is_axes(x) -> bool:
    """A tuple of logical axis names (a leaf of a batch's axes()), not a batch NamedTuple holding them."""
    return isinstance(x, tuple) and not hasattr(x, "_fields") and all(a is None or isinstance(a, str) for a in x)


def batch_shardings(mesh: jax.sharding.Mesh, batch_axes, *lead: str):
    """The sharding of every entry of a batch from its logical axes (`BatchType.axes()`), under `lead` axes."""
    return jax.tree.map(lambda axes: logical_sharding(mesh, *lead, *axes), batch_axes, is_leaf=_is_axes)


def batch_split(mesh: jax.sharding.Mesh) -> int:
    """How many parts the rows of a batch are split into."""
    return math.prod(mesh.shape[a] for a in mesh_axes_for("batch"))


def tree_shardings(logical_specs, mesh: jax.sharding.Mesh):
    # Leaf by leaf: flax's logical_to_mesh_sharding takes any tuple for a spec, so it would turn the empty
    # nodes optax leaves in a partitioned optimizer's state (Muon's) into shardings.
    return jax.tree.map(lambda spec: NamedSharding(mesh, nn.logical_to_mesh_axes(spec, RULES)), logical_specs,
                        is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def jit_on_mesh(fn, mesh: jax.sharding.Mesh, **jit_kwargs):
    """jax.jit of `fn`, traced and run with `mesh` active and the logical rules in force.

    Linen's activation constraints are silently dropped when no mesh is active, hence the wrapper.
    """
    def under_rules(*args):
        with nn.logical_axis_rules(RULES):
            return fn(*args)
    jitted = jax.jit(under_rules, **jit_kwargs)

    def call(*args):
        with jax.set_mesh(mesh):
            return jitted(*args)

    def lower(*args):  # for ahead-of-time compilation (llm-jax bench: compile time, XLA's memory plan)
        with jax.set_mesh(mesh):
            return jitted.lower(*args)
    call.lower = lower
    return call


def global_batch(local, shardings):
    """Assembles each process's rows of every batch entry into a global array laid out by that entry's
    sharding (multi-host safe)."""
    return jax.tree.map(lambda rows, s: jax.make_array_from_process_local_data(s, rows), local, shardings)
