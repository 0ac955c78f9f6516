"""Sweeps: one experiment trained at several settings, each point in its own run directory.

A sweep is a Python file (conventionally under experiments/sweeps/) defining `sweep() -> Sweep`:

    from llm_jax.sweep.plan import Sweep

    def sweep() -> Sweep:
        return Sweep(base="pretrain_tiny", grid={"model.n_layers": (1, 2, 4)}, overrides=("train.steps=300",))

The points are the cartesian product of `grid`, then the explicit `points`. Every point's config is built
as its run will train with it (checkpoint.init_from applied), validated and checked by its task before
anything runs. Point `{"model.n_layers": 4, "optim.learning_rate": 0.003}` runs in
SWEEP_DIR/n_layers=4,learning_rate=0.003 (the full dotted key where two swept keys end alike).

A point whose run has results.json is skipped; any other runs the same plain `train` again, which resumes
from its latest checkpoint or, when an earlier attempt stopped before its first checkpoint, restarts from
step 0 (so a requeued SLURM job continues too). Only a directory holding an attempt of another config (the
sweep file changed) is deleted first, as `--fresh` would, keeping the TensorBoard HParams session the sweep
writes there. Re-running a sweep thus finishes it; do not re-run one whose runs are still going.

Points of the same task, data section and vocabulary (whatever the task: a corpus, dialogues, preference
pairs) share one prepared copy of their data, SWEEP_DIR/data/<hash of those>: `llm-jax prepare` runs once
(run.py says when, per launcher), and each run trains with data.prepared pointing there. Only a sweep whose
config already sets data.prepared leaves it alone.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from llm_jax import tasks
from llm_jax.config import Config, to_dict
from llm_jax.errors import ConfigError, RunDirError
from llm_jax.experiment import EXPERIMENTS_DIR, apply_overrides, load_definition, load_experiment, resolve
from llm_jax.train.checkpoint import committed_steps
from llm_jax.train.setup import saved_differences


@dataclass(frozen=True)
class Sweep:
    base: str  # experiment name or path, as experiment.load_experiment takes it
    grid: dict[str, tuple] = field(default_factory=dict)  # dotted key -> values; the cartesian product
    points: tuple[dict[str, object], ...] = ()  # explicit points, after the grid's
    overrides: tuple[str, ...] = ()  # "key=value" for every point
    name: str = ""  # default: the sweep file's stem


@dataclass(frozen=True)
class Run:
    name: str
    run_dir: Path
    # Every --set its `train` gets: the sweep's, the caller's, the point's own, then data.prepared=`data`.
    overrides: tuple[str, ...]
    cfg: Config  # the config `train` resolves from those overrides, and writes to RUN_DIR/config.json
    hparams: dict  # every swept key -> its value in this run's config
    data: Path | None  # the shared prepared data, or None: the run uses data.prepared as its config sets it
    data_overrides: tuple[str, ...]  # the --set, less data.prepared, of the first point with this data: prepare
    metrics: tuple[str, ...]  # the scalars that sum up a run of its task (HParams metrics)


def load_sweep(path: str | Path) -> Sweep:
    """`sweep()` of a sweep file, given as a path or as a name under experiments/sweeps/."""
    sweep = load_definition(path, EXPERIMENTS_DIR / "sweeps", "sweep", Sweep, "sweep")
    return sweep if sweep.name else dataclasses.replace(sweep, name=Path(path).stem)


def expand(sweep: Sweep) -> list[dict]:
    """The points: the grid's cartesian product (in key order), then the explicit points."""
    keys = list(sweep.grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(sweep.grid[k] for k in keys))] if keys else []
    points += [dict(p) for p in sweep.points]
    if not points:
        raise ConfigError(f"sweep {sweep.name!r} has no points (an empty grid value, or no grid and no points)")
    return points


def plan(sweep: Sweep, sweep_dir: Path, extra_overrides=()) -> list[Run]:
    """Every point's run, its config resolved and checked by its task; a bad key or value, a task that cannot
    run the config, or two points that make the same config fail here, before anything runs."""
    base = load_experiment(sweep.base)
    common = [*sweep.overrides, *extra_overrides]
    resolve(apply_overrides(base, common))
    points = expand(sweep)
    keys = list(dict.fromkeys(k for p in points for k in p))
    clash = sorted(set(keys) & {o.split("=", 1)[0].strip() for o in common})
    if clash:
        raise ConfigError(f"sweep {sweep.name!r}: {', '.join(clash)} is swept and also overridden for every point")
    labels = _labels(keys)
    runs, configs, preparers = [], {}, {}
    for point in points:
        name = ",".join(f"{labels[k]}={_text(v)}" for k, v in point.items()) or "base"
        name = re.sub(r"[^A-Za-z0-9._=,-]", "_", name)
        overrides = (*common, *(f"{k}={_text(v)}" for k, v in point.items()))
        try:
            cfg = resolve(apply_overrides(base, list(overrides)))
            task = tasks.make(cfg)
        except ConfigError as e:
            raise ConfigError(f"sweep {sweep.name!r}, point {name}: {e}") from None
        if cfg in configs or any(r.name == name for r in runs):
            raise ConfigError(f"sweep {sweep.name!r}: points {configs.get(cfg, name)} and {name} are the same run")
        configs[cfg] = name
        data = _shared_data(cfg, Path(sweep_dir))
        trains = (*overrides, f"data.prepared={data}") if data else overrides
        runs.append(Run(name, Path(sweep_dir) / name, trains, resolve(apply_overrides(base, list(trains))),
                        {k: _hparam_value(cfg, k) for k in keys}, data, preparers.setdefault(data, overrides),
                        tuple(tag for tag, _ in task.summary_scalars)))
    return runs


def _labels(keys: list[str]) -> dict[str, str]:
    """The last component of each dotted key, or the whole key where two keys share it."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (short if last.count(short) == 1 else k) for k, short in zip(keys, last)}


def _text(value) -> str:
    """A value as `--set` parses it back."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return repr(value) if isinstance(value, float) else str(value)


def _hparam_value(cfg: Config, key: str):
    value = to_dict(cfg)
    for part in key.split("."):
        value = value[part]
    return ",".join(map(str, value)) if isinstance(value, tuple) else value


LATER_DATA_FIELDS = ("chat_template",)


def _shared_data(cfg: Config, sweep_dir: Path) -> Path | None:
    """Where this point's data is prepared once for the sweep; None where the config already names it."""
    if cfg.data.prepared:
        return None
    # The task, the resolved data section (with the tokenizer init_from gives) and the vocabulary decide the
    # prepared data: a superset of what prepare compares. A data field added later is left out at its default,
    # so that a sweep resumed after the upgrade finds the data it prepared.
    data = {k: v for k, v in to_dict(cfg.data).items() if not (k in LATER_DATA_FIELDS and not v)}
    key = json.dumps([cfg.task, data, cfg.model.vocab_size], sort_keys=True)
    return sweep_dir / "data" / hashlib.sha256(key.encode()).hexdigest()[:12]


def train_args(sweep: Sweep, run: Run) -> list[str]:
    return ["train", "--config", sweep.base, "--run-dir", str(run.run_dir), *_set_flags(run.overrides)]


def prepare_args(sweep: Sweep, run: Run) -> list[str]:
    return ["prepare", "--config", sweep.base, "--out", str(run.data), *_set_flags(run.data_overrides)]


def _set_flags(overrides) -> list[str]:
    return [flag for item in overrides for flag in ("--set", item)]


RESTART_AFRESH = "restart afresh (an earlier attempt of another config left no checkpoint: its directory is deleted)"


def run_state(run: Run) -> str:
    """finished, resume from a step, restart (from step 0 by `train` itself, or afresh where the directory
    holds another config's attempt, which the sweep owns and deletes), or new."""
    if (run.run_dir / "results.json").exists():
        return "finished"
    steps = committed_steps(run.run_dir)
    if steps:
        return f"resume from step {steps[-1]}"
    if (run.run_dir / "config.json").exists():
        try:
            same = not saved_differences(run.run_dir, run.cfg)
        except RunDirError:
            same = False
        return "restart from step 0 (an earlier attempt left no checkpoint)" if same else RESTART_AFRESH
    return "new"
