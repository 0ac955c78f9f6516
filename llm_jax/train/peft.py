"""Parameter-efficient fine-tuning in a run (config section `peft`, model/adapters.py).

The train state holds only what trains (adapters.split: the adapters, and a head the task adds), so the gradient,
the optimizer's state and every checkpoint cover nothing else. The frozen base is read once from
checkpoint.init_from, held in peft.base_dtype, and handed to the jitted steps as the frozen params "base";
with_base() puts the two halves together inside the step. Checkpoints record the base export's fingerprint, and
a run resumed or exported against another base is refused.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp

from llm_jax.config import Config
from llm_jax.errors import CheckpointError, ConfigError
from llm_jax.model import adapters

BASE = "base"  # the frozen params' name


def enabled(cfg: Config) -> bool:
    return cfg.peft.method != "none"


def trainable(cfg: Config):
    """params -> the part a run of cfg trains (all of it without peft)."""
    return (lambda params: adapters.split(params)[0]) if enabled(cfg) else (lambda params: params)


def frozen_part(params) -> dict:
    return adapters.split(params)[1]


def base_layout(cfg: Config, params_layout):
    """The frozen base's shapes, dtypes (peft.base_dtype) and shardings, from the model's whole params layout."""
    dtype = jnp.dtype(cfg.peft.base_dtype)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
        a.shape, dtype if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype, sharding=a.sharding),
        frozen_part(params_layout))


def with_base(params, frozen: dict):
    """The model's whole params tree: the trained params, with the frozen base where the run has one."""
    return adapters.merge(params, frozen[BASE]) if BASE in frozen else params


def load_base(task, layout, dtype: str = "") -> dict:
    """The frozen base of a peft run: what its task starts from (checkpoint.init_from's params; PPO's value trunk
    from its reward model too), laid out like `layout` (the model's params less the trained part), floating-point
    ones cast to `dtype` (default peft.base_dtype)."""
    params, fresh = task.initial_params(layout)
    if fresh:
        raise ConfigError(f"checkpoint.init_from={task.cfg.checkpoint.init_from} has no {', '.join(fresh)} for the "
                          f"frozen base of peft.method={task.cfg.peft.method}")
    dtype = jnp.dtype(dtype or task.cfg.peft.base_dtype)
    cast = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, p))
    return cast(params) if dtype != jnp.float32 else params


@functools.lru_cache(maxsize=8)
def _digest(path: str, stamp: tuple) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in (Path(path) / "params").rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def fingerprint(export: Path) -> str:
    """sha256 of an export's params files: what a peft run's adapters belong to."""
    export = Path(export).expanduser().resolve()
    files = sorted((export / "params").rglob("*"))
    return _digest(str(export), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def check_base(saved_meta: dict, cfg: Config, what: str) -> None:
    """A one-line CheckpointError unless checkpoint.init_from is the base export `what` was trained on."""
    want = saved_meta.get("peft_base")
    if want and fingerprint(Path(cfg.checkpoint.init_from)) != want:
        raise CheckpointError(f"{what} holds adapters of another base model than checkpoint.init_from="
                              f"{cfg.checkpoint.init_from} (params sha256 {want[:12]}… expected)")


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def describe(cfg: Config, state, frozen: dict) -> str:
    """What a peft run trains, in one line: trainable against total parameters, optimizer-state bytes."""
    trained = sum(x.size for x in jax.tree.leaves(state.params))
    total = trained + sum(x.size for x in jax.tree.leaves(frozen[BASE]))
    return (f"peft {cfg.peft.method}: {trained:,} trainable of {total:,} params ({trained / total:.2%}); optimizer "
            f"state {_bytes(state.opt_state) / 2**20:.2f} MiB; frozen base {_bytes(frozen[BASE]) / 2**20:.1f} MiB "
            f"in {cfg.peft.base_dtype}")
