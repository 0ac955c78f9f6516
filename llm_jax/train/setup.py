"""Everything a run needs, built and checked once before the first step: the task, the mesh, the data, the
train state (created sharded, restored from the run directory's latest checkpoint, or initialised from an
export) and the jitted steps. Errors a user can fix come out here, before anything compiles.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax

from llm_jax import tasks
from llm_jax.config import Config, from_dict
from llm_jax.errors import ConfigError, RunDirError
from llm_jax.experiment import resolve
from llm_jax.parallel import sharding
from llm_jax.parallel.distributed import barrier, is_main
from llm_jax.tasks.base import Task
from llm_jax.train import checkpoint, metrics, optim, peft, step
from llm_jax.train.export import load_frozen_params
from llm_jax.train.state import abstract_params, abstract_state, create_state, with_planned_steps


@dataclass
class Setup:
    cfg: Config
    task: Task
    run_dir: Path
    mesh: jax.sharding.Mesh
    data: object  # what task.load returned
    state: object
    frozen: dict  # the task's frozen params (the third argument of train_fn and eval_fn)
    start_step: int
    train_fn: object  # (state, batch, frozen) -> (state, metrics)
    eval_fn: object  # (params, batch, frozen) -> sums
    n_params: int
    earlier_attempt: bool  # the run directory holds a run of this config already (resumed or restarted)
    # The run's length as planned in the state: train.steps, a time budget's plan restored from a checkpoint,
    # or 0 while a time budget has yet to plan it (train/budget.py).
    planned_steps: int
    # Training, evaluation and checkpoint seconds of the attempts before the checkpoint resumed from
    # (train/budget.Clock.report's keys), so that a resumed run's times and budget count the whole run.
    time_before: dict
    # eval.tasks' ModelRunner, made at the first evaluation and given each evaluation's params, so that its
    # jitted forward and generation steps compile once per run
    benchmark_runner: object = None


class RunDir(NamedTuple):
    resume: bool  # from the latest checkpoint
    earlier_attempt: bool  # config.json is there: a run of this config got as far as writing it
    created: bool  # by this attempt, so removed again if it fails before training starts


def build(cfg: Config, run_dir: Path, devices=None, fresh: bool = False) -> Setup:
    """Resolves and checks the config, the mesh and every dimension, prepares data, creates or restores the
    sharded state, and jits the steps."""
    cfg = resolve(cfg)
    task = tasks.make(cfg)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    check_batch(cfg, mesh)
    if cfg.train.seq_len_warmup_steps and not hasattr(task.batch_type, "shorter"):
        raise ConfigError(f"train.seq_len_warmup_steps: task {cfg.task!r} trains on {task.batch_type.__name__} rows, "
                          "which cannot be cut into shorter windows")
    model = tasks.model_of(cfg)
    optimizer = optim.make_optimizer(cfg.optim)
    select = peft.trainable(cfg)
    layout = abstract_state(model, optimizer, mesh, cfg.data.seq_len, select)
    opened = open_run_dir(run_dir, fresh, cfg)
    try:
        data = load_data(task, run_dir)
        state, shardings = create_state(model, optimizer, layout, cfg.data.seq_len, jax.random.key(cfg.train.seed),
                                        select)
        frozen = load_frozen(task, model, mesh, data.tokenizer)
        if is_main():
            checkpoint.check_writable(run_dir, checkpoint.estimated_bytes(state), cfg.checkpoint.keep)
    except Exception:
        if opened.created:  # a run that never started leaves nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    state, start_step, time_before = _initial_state(task, run_dir, opened.resume, state, data)
    cfg, state, planned = _plan_length(cfg, state)
    frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)
    train_fn = step.jit_train_step(model, optimizer, cfg.optim, mesh, shardings, task, frozen_shardings)
    whole_shardings = jax.tree.map(lambda x: x.sharding, peft.with_base(state.params, frozen))
    eval_fn = step.jit_eval_step(model, mesh, whole_shardings, task, frozen_shardings)
    if peft.enabled(cfg) and is_main():
        print(peft.describe(cfg, state, frozen), flush=True)
    return Setup(cfg, task, run_dir, mesh, data, state, frozen, start_step, train_fn, eval_fn,
                 metrics.param_count(peft.with_base(state.params, frozen)), opened.earlier_attempt, planned,
                 time_before)


def _plan_length(cfg: Config, state):
    """(config, state, planned steps): a run without a time budget plans train.steps (raising it on resume trains
    longer, the schedule stretched); a time-budget run keeps the plan a checkpoint holds (its train.steps becomes
    that), or has none yet (0)."""
    if not cfg.train.time_budget_s:
        return cfg, with_planned_steps(state, cfg.train.steps), cfg.train.steps
    planned = int(jax.device_get(state.planned_steps))
    if planned:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=planned))
    return cfg, state, planned


def check_batch(cfg: Config, mesh) -> None:
    micro = cfg.train.batch_size // cfg.train.microbatches
    sharding.check_divisible(f"train.batch_size={cfg.train.batch_size} / train.microbatches="
                             f"{cfg.train.microbatches}", (micro,), ("batch",), mesh)
    if micro % jax.process_count():
        raise ConfigError(f"train.batch_size / train.microbatches = {micro} is not divisible by the "
                          f"{jax.process_count()} processes")


def load_data(task: Task, run_dir: Path):
    """A directory of prepared data if the config names one, else the task prepares it once into RUN_DIR/data
    (reused when complete: data directories appear whole, see data/shards.PreparedDir.publish)."""
    prepared = task.cfg.data.prepared
    if not prepared:
        if is_main():
            task.prepare(run_dir / "data")
        barrier("prepared")
    return task.load(Path(prepared) if prepared else run_dir / "data")


def open_run_dir(run_dir: Path, fresh: bool, cfg: Config) -> RunDir:
    """How this run continues what the directory holds: from its latest checkpoint; from step 0 when an
    earlier attempt of the same config stopped before its first checkpoint (what it logged is cut); afresh in
    an empty or new directory. --fresh deletes the directory first; an attempt of another config without a
    checkpoint is refused, naming the keys that differ (with a checkpoint, checkpoint.py compares the model)."""
    if fresh and run_dir.exists() and is_main():
        shutil.rmtree(run_dir)
    barrier("fresh")
    if (run_dir / "config.json").exists():
        if checkpoint.committed_steps(run_dir):
            return RunDir(resume=True, earlier_attempt=True, created=False)
        diffs = saved_differences(run_dir, cfg)
        if diffs:
            raise RunDirError(f"run directory {run_dir} holds a run of another config with no checkpoint "
                              f"({'; '.join(diffs)}); pass --fresh to delete it and start over")
        return RunDir(resume=False, earlier_attempt=True, created=False)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create run directory {run_dir}: {e.strerror or e}") from None
    return RunDir(resume=False, earlier_attempt=False, created=created)


def saved_differences(run_dir: Path, cfg: Config) -> list[str]:
    """The keys in which the config an earlier attempt saved in RUN_DIR/config.json differs from cfg
    (checkpoint.differences); a config.json llm_jax did not write is a RunDirError."""
    try:
        saved = from_dict(json.loads((run_dir / "config.json").read_text()))
    except (ValueError, TypeError) as e:  # a config.json another program left (atomic writes leave none)
        raise RunDirError(f"{run_dir / 'config.json'} is not an llm_jax config ({e}); pass --fresh to "
                          "delete the directory and start over") from None
    return checkpoint.differences(saved, cfg)


def load_frozen(task: Task, model, mesh, tokenizer) -> dict:
    """The params of the task's frozen exports (Task.frozen_exports) and a peft run's base, laid out like the
    model's params (without the trained part, for peft)."""
    cfg = task.cfg
    layout = abstract_params(model, mesh, cfg.data.seq_len)
    if peft.enabled(cfg):
        layout = peft.frozen_part(layout)
    frozen = {name: load_frozen_params(path, cfg, layout, tokenizer, key, name)
              for name, (key, path) in task.frozen_exports().items()}
    if peft.enabled(cfg):
        frozen[peft.BASE] = peft.load_base(task, layout)
    return frozen


def _initial_state(task: Task, run_dir: Path, resume: bool, state, data):
    cfg = task.cfg
    if resume:
        restored = checkpoint.restore_latest(run_dir, cfg, state, data.tokenizer)
        if restored is None:
            raise RunDirError(f"run directory {run_dir} has no readable checkpoint left (damaged ones are in "
                              f"{run_dir / 'corrupt_checkpoints'}); pass --fresh to start over")
        state, step, saved = restored
        return state, step, saved.get("time", {})  # (checkpoints of older versions did not keep it)
    if cfg.checkpoint.init_from and not peft.enabled(cfg):  # (a peft run's base is frozen, its adapters new)
        params, fresh = task.initial_params(state.params)
        if fresh and is_main():
            print(f"init_from {cfg.checkpoint.init_from}: {', '.join(fresh)} initialised fresh (not in the export)")
        return state.replace(params=params), 0, {}
    return state, 0, {}
