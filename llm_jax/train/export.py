"""Exports and inference loading: a checkpoint's params with its config and tokenizer in a directory of their
own (`llm-jax export`), a run directory or export loaded onto a mesh for inference, and an export's params
as the start of a new run (checkpoint.init_from).

An export directory holds params/ (orbax), config.json, tokenizer.model, step and, for a checkpoint that
carried evaluation scores (a reward model's), eval.json.
"""
from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from llm_jax import tasks
from llm_jax.atomic import atomic_directory
from llm_jax.config import CheckpointConfig, Config, MeshConfig, from_dict, to_dict
from llm_jax.data.tokenizer import Tokenizer, from_bytes
from llm_jax.errors import CheckpointError, ConfigError, MeshError
from llm_jax.model import adapters
from llm_jax.parallel import sharding
from llm_jax.train import peft
from llm_jax.train.checkpoint import RUN_KEYS, checkpoint_dir, committed_steps, differences, manager, restore_params
from llm_jax.train.state import abstract_params


def export_params(run_dir: Path, out: Path, step: int | None = None, merge: bool = False) -> tuple[int, bool]:
    """Writes the params of a checkpoint (the latest by default) with the config and tokenizer to `out`.
    Returns the step and whether `out` was written now: the same export made before (the same command run
    again, after a kill that came too late to matter) is left as it is.

    A peft run's checkpoints hold only its adapters: merge=True writes a whole model, its base with LoRA's
    updates folded into the kernels (an ordinary export), or with the prompt or prefix vectors beside them."""
    run_dir, out = Path(run_dir), Path(out)
    step = _saved_step(run_dir, step, f"no checkpoint in {checkpoint_dir(run_dir)}")
    meta = _saved_meta(run_dir, step)
    cfg = from_dict(meta["config"])
    if peft.enabled(cfg) and not merge:
        raise CheckpointError(f"{run_dir} is a peft.method={cfg.peft.method} run, whose checkpoints hold only the "
                              "adapters: pass --merge for a whole model, or use `llm-jax export-hf` for a Hugging "
                              "Face PEFT adapter directory")
    saved = json.loads(json.dumps(to_dict(dataclasses.replace(cfg, peft=tasks.exported_peft(cfg)))))  # as on disk
    if out.exists():
        if _is_export(out) and (out / "step").read_text().strip() == str(step) and \
                json.loads((out / "config.json").read_text()) == saved:
            return step, False
        raise CheckpointError(f"export directory {out} already exists (and is not this export of step {step})")
    params = _restore(run_dir, cfg, inference_mesh(cfg), step)
    with atomic_directory(out) as tmp, ocp.StandardCheckpointer() as ckpt:
        ckpt.save((tmp / "params").absolute(), params)
        (tmp / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
        if meta.get("eval"):
            (tmp / "eval.json").write_text(json.dumps(meta["eval"], indent=2, sort_keys=True))
        (tmp / "tokenizer.model").write_bytes(base64.b64decode(meta["tokenizer_model"]))
        (tmp / "step").write_text(f"{step}\n")
    return step, True


def inference_mesh(cfg: Config):
    """The training mesh of `cfg` if these devices fit it, else FSDP over all of them."""
    try:
        return sharding.make_mesh(cfg.mesh)
    except MeshError:
        return sharding.make_mesh(MeshConfig(1, -1, 1))


def load_for_inference(path: Path, step: int | None = None, mesh=None) -> tuple[Config, object, Tokenizer]:
    """Config, params (of its exported model: tasks.exported_model) and tokenizer from a run directory (its
    latest checkpoint, or `step`) or an export, laid out on `mesh` (default: inference_mesh)."""
    path = Path(path)
    if _is_export(path):
        cfg = saved_config(path)
        return cfg, _restore(path, cfg, mesh or inference_mesh(cfg)), Tokenizer.load(path / "tokenizer.model")
    step = _saved_step(path, step, f"{path} is neither a run directory with checkpoints nor an `llm-jax export` "
                                   "directory")
    saved = _saved_meta(path, step)
    cfg = from_dict(saved["config"])
    return (cfg, _restore(path, cfg, mesh or inference_mesh(cfg), step),
            from_bytes(base64.b64decode(saved["tokenizer_model"])))


def saved_config(path: Path, step: int | None = None, key: str = "") -> Config:
    """The config of an export or of a run directory's checkpoint (its latest, or `step`); `key` names the
    config key that gave the path, for the error when it is neither."""
    path = Path(path)
    if _is_export(path):
        return from_dict(json.loads((path / "config.json").read_text()))
    what = f"{key}={path}" if key else str(path)
    step = _saved_step(path, step, f"{what} is neither a run directory with checkpoints nor an `llm-jax export` "
                                   "directory")
    return from_dict(_saved_meta(path, step)["config"])


def _restore(path: Path, cfg: Config, mesh, step: int | None = None):
    """The params of cfg's exported model from an export or a run directory's checkpoint, laid out on `mesh`."""
    if _is_export(path):
        with ocp.StandardCheckpointer() as ckpt:
            return ckpt.restore((path / "params").absolute(), abstract_params(tasks.exported_model(cfg), mesh))
    step = _saved_step(path, step, "")
    layout = abstract_params(tasks.model_of(cfg), mesh)
    trained = restore_params(path, step, peft.trainable(cfg)(layout))
    if peft.enabled(cfg):
        trained = _with_frozen_base(path, cfg, step, layout, trained)
    return tasks.exported_params(cfg, trained)


def load_adapters(run_dir: Path, step: int | None = None) -> tuple[Config, dict]:
    """The config and the trained part (adapters, a new head) of a peft run's checkpoint, on the host."""
    run_dir = Path(run_dir)
    step = _saved_step(run_dir, step, f"no checkpoint in {checkpoint_dir(run_dir)}")
    cfg = from_dict(_saved_meta(run_dir, step)["config"])
    if not peft.enabled(cfg):
        raise CheckpointError(f"{run_dir} is not a peft run (peft.method=none): it has no adapters")
    layout = abstract_params(tasks.model_of(cfg), inference_mesh(cfg))
    return cfg, jax.device_get(restore_params(run_dir, step, peft.trainable(cfg)(layout)))


def _with_frozen_base(run_dir: Path, cfg: Config, step: int, layout, adapters_: dict):
    """A peft run's whole model at checkpoint `step`: its adapters on the base they were trained on (float32),
    LoRA's folded into the kernels."""
    peft.check_base(_saved_meta(run_dir, step), cfg, f"{run_dir} (step {step})")
    base = peft.load_base(tasks.make(cfg, check=False), peft.frozen_part(layout), dtype="float32")
    params = adapters.merge(adapters_, base)
    return adapters.fold_lora(params, cfg.peft) if cfg.peft.method == "lora" else params


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
    """Params from an `llm-jax export` directory (or a run directory's latest checkpoint), checked against the
    model and resharded like the target.

    The export may differ in RUN_FIELDS (another head: its other params are used, the target's own head keeps
    its initialisation). Returns the params and the names of the top-level params that were not in the export.
    `key` is the config key that names the export, for errors.
    """
    path = Path(path)
    if not _is_export(path) and not committed_steps(path):
        raise ConfigError(f"{key}={path}: not an export directory (no params/ or config.json); "
                          "make one with `llm-jax export`")
    saved = saved_config(path, key=key)
    # Another task's export (a language model for a reward model) gives its trunk; the head is this run's.
    diffs = differences(saved, cfg, keys=("model.",), ignore=RUN_KEYS)
    if diffs:
        raise CheckpointError(f"{key}={path} has a different model ({'; '.join(diffs)})")
    loaded = _restore(path, saved, jax.tree.leaves(target_params)[0].sharding.mesh)
    fresh = sorted(set(target_params) - set(loaded))
    return {k: loaded.get(k, v) for k, v in target_params.items()}, fresh


def load_frozen_params(path: Path, cfg: Config, target_params, tokenizer, key: str, name: str):
    """A model that a run reads but never trains (a reference), from `key`'s export: the whole language model of
    cfg's architecture, laid out like target_params, with the run's tokenizer."""
    params, missing = load_params(path, cfg, target_params, key)
    if missing:
        raise ConfigError(f"{key}={path} has no {', '.join(missing)} (a model with another head?); the "
                          f"{name} model must be a language model export")
    exported = Tokenizer.load(path / "tokenizer.model") if _is_export(path) else load_for_inference(path)[2]
    if exported.sha256 != tokenizer.sha256:
        raise ConfigError(f"{key}={path} has another tokenizer than the run's ({cfg.data.tokenizer})")
    return params
