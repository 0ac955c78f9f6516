"""Exports and inference loading: a checkpoint's params with its config and tokenizer in a directory of their
own (`llm-jax export`), a run directory or export loaded onto a mesh for inference, and an export's params
as the start of a new run (checkpoint.init_from).

An export directory holds params/ (orbax), config.json, tokenizer.model, step and, for a checkpoint that
carried evaluation scores (a reward model's), eval.json.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from llm_jax import tasks
from llm_jax.atomic import atomic_directory
from llm_jax.config import HEAD_FIELDS, CheckpointConfig, Config, MeshConfig, differences, from_dict
from llm_jax.data.tokenizer import Tokenizer, from_bytes
from llm_jax.errors import CheckpointError, ConfigError, MeshError
from llm_jax.parallel import sharding
from llm_jax.train.checkpoint import checkpoint_dir, committed_steps, manager, restore_params
from llm_jax.train.state import abstract_params


def export_params(run_dir: Path, out: Path, step: int | None = None) -> tuple[int, bool]:
    """Writes the params of a checkpoint (the latest by default) with the config and tokenizer to `out`.
    Returns the step and whether `out` was written now: the same export made before (the same command run
    again, after a kill that came too late to matter) is left as it is."""
    run_dir, out = Path(run_dir), Path(out)
    step = _saved_step(run_dir, step, f"no checkpoint in {checkpoint_dir(run_dir)}")
    meta = _saved_meta(run_dir, step)
    if out.exists():
        if _is_export(out) and (out / "step").read_text().strip() == str(step) and \
                json.loads((out / "config.json").read_text()) == meta["config"]:
            return step, False
        raise CheckpointError(f"export directory {out} already exists (and is not this export of step {step})")
    params = restore_params(run_dir, step, _params_target(from_dict(meta["config"])))
    with atomic_directory(out) as tmp, ocp.StandardCheckpointer() as ckpt:
        ckpt.save((tmp / "params").absolute(), params)
        (tmp / "config.json").write_text(json.dumps(meta["config"], indent=2, sort_keys=True))
        if meta.get("eval"):
            (tmp / "eval.json").write_text(json.dumps(meta["eval"], indent=2, sort_keys=True))
        (tmp / "tokenizer.model").write_bytes(base64.b64decode(meta["tokenizer_model"]))
        (tmp / "step").write_text(f"{step}\n")
    return step, True


def _params_target(cfg: Config):
    """The abstract params of `cfg`, laid out on the training mesh if these devices fit it, else FSDP."""
    try:
        mesh = sharding.make_mesh(cfg.mesh)
    except MeshError:
        mesh = sharding.make_mesh(MeshConfig(1, -1, 1))
    return abstract_params(tasks.model_of(cfg), mesh)


def load_for_inference(path: Path, step: int | None = None) -> tuple[Config, object, Tokenizer]:
    """Config, params and tokenizer from a run directory (its latest checkpoint, or `step`) or an export."""
    path = Path(path)
    if _is_export(path):
        cfg = from_dict(json.loads((path / "config.json").read_text()))
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore((path / "params").absolute(), _params_target(cfg))
        return cfg, params, Tokenizer.load(path / "tokenizer.model")
    step = _saved_step(path, step, f"{path} is neither a run directory with checkpoints nor an `llm-jax export` "
                                   "directory")
    saved = _saved_meta(path, step)
    cfg = from_dict(saved["config"])
    return cfg, restore_params(path, step, _params_target(cfg)), from_bytes(base64.b64decode(saved["tokenizer_model"]))


def saved_eval(path: Path, step: int | None = None) -> dict[str, float]:
    """The eval scores saved with a checkpoint (run directory: its latest, or `step`) or an export; {} if none."""
    path = Path(path)
    if _is_export(path):
        return json.loads((path / "eval.json").read_text()) if (path / "eval.json").is_file() else {}
    step = _saved_step(path, step, f"no checkpoint in {checkpoint_dir(path)}")
    return _saved_meta(path, step).get("eval", {})


def _saved_step(run_dir: Path, step: int | None, missing: str) -> int:
    """`step`, or the latest committed one, checked to exist; `missing` is the error where there is none."""
    steps = committed_steps(run_dir)
    if not steps:
        raise CheckpointError(missing)
    step = steps[-1] if step is None else step
    if step not in steps:
        raise CheckpointError(f"no checkpoint for step {step} in {checkpoint_dir(run_dir)} (have {steps})")
    return step


def _saved_meta(run_dir: Path, step: int) -> dict:
    """The metadata (config, tokenizer, eval scores) saved with a run directory's checkpoint `step`."""
    mngr = manager(run_dir, CheckpointConfig(), read_only=True)
    try:
        return mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        mngr.close()


def _is_export(path: Path) -> bool:
    return (path / "params").is_dir() and (path / "config.json").is_file()


def load_params(path: Path, cfg: Config, target_params, key: str = "checkpoint.init_from") -> tuple[dict, list[str]]:
    """Params from an `llm-jax export` directory, checked against the model and resharded like the target.

    The export may have another head (HEAD_FIELDS): its other params are used, the target's own head keeps
    its initialisation. Returns the params and the names of the top-level params that were not in the export.
    `key` is the config key that names the export, for errors.
    """
    path = Path(path)
    if not _is_export(path):
        raise ConfigError(f"{key}={path}: not an export directory (no params/ or config.json); "
                          "make one with `llm-jax export`")
    saved = from_dict(json.loads((path / "config.json").read_text()))
    # Another task's export (a language model for a reward model) gives its trunk; the head is this run's.
    diffs = differences(saved, cfg, keys=("model.",), ignore=tuple(f"model.{f}" for f in HEAD_FIELDS))
    if diffs:
        raise CheckpointError(f"{key}={path} has a different model ({'; '.join(diffs)})")
    mesh = jax.tree.leaves(target_params)[0].sharding.mesh
    with ocp.StandardCheckpointer() as ckpt:
        loaded = ckpt.restore((path / "params").absolute(), abstract_params(tasks.model_of(saved), mesh))
    fresh = sorted(set(target_params) - set(loaded))
    return {k: loaded.get(k, v) for k, v in target_params.items()}, fresh

