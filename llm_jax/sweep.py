"""Sweeps: one experiment trained at several settings, each point in its own run directory.

A sweep is a Python file (conventionally under experiments/sweeps/) defining `sweep() -> Sweep`:

    def sweep() -> Sweep:
        return Sweep(base="pretrain_tiny", grid={"model.n_layers": (1, 2, 4)}, overrides=("train.steps=300",))

The points are the cartesian product of `grid`, then the explicit `points`. Every point's config is built
and validated before anything runs. Point `{"model.n_layers": 4, "optim.learning_rate": 0.003}` runs in
SWEEP_DIR/n_layers=4,learning_rate=0.003 (the full dotted key where two swept keys end alike).

A point whose run has results.json is skipped; one with a committed checkpoint is resumed (a plain
`train`, so a requeued SLURM job resumes too); one whose earlier attempt left no checkpoint has that
directory deleted first, as `--fresh` would, since `--fresh` would also delete the TensorBoard HParams
session written there before the run starts. Re-running a sweep thus finishes it; do not re-run one whose
runs are still going.

Points of pretraining on the same data config and vocabulary share one tokenized copy of the corpus,
SWEEP_DIR/data/<hash of the data config>: `llm-jax prepare` runs once (locally before the runs; on SLURM at
the start of every job, where the first to finish publishes it; on a TPU slice before the first run), and
each run trains with data.prepared pointing there.

Launchers (llm_jax/launch.py): `local` runs the points one after another (or `parallel` at a time, each
logging to RUN_DIR/train.log); `local-multiprocess` runs each as one job of several CPU processes; `slurm`
writes SWEEP_DIR/slurm/<run>.sbatch per point and submits it; `tpu` runs each point's gcloud commands in
turn on one slice. A failed point does not stop the others; Ctrl-C does. Finished, resumed and restarted
are judged from SWEEP_DIR as this machine sees it: on a TPU slice the runs live on the workers, where a
plain `train` resumes by itself.

SWEEP_DIR/sweep.json records the sweep and its runs (llm_jax/report.py reads it); the event file in
SWEEP_DIR holds the HParams experiment (swept keys, their values, the metrics), so `tensorboard --logdir
SWEEP_DIR` shows the HParams dashboard next to the curves of every run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import summary_v2 as hp
from tensorboard.summary.writer.record_writer import RecordWriter

from llm_jax import launch
from llm_jax.checkpoint import committed_steps
from llm_jax.config import EXPERIMENTS_DIR, Config, ConfigError, apply_overrides, load_experiment, to_dict, validate

METRICS = ("eval/bits_per_byte", "eval/bits_per_token", "train/bits_per_byte", "train/loss_bits_per_token")
LAUNCHERS = ("local", "local-multiprocess", "slurm", "tpu")
INTERRUPTED = (75, 130)  # a run preempted by Ctrl-C/SIGTERM (checkpoint saved) or killed by Ctrl-C
_SESSION_SUFFIX = ".sweep-hparams"  # names this sweep's own event files; Writer's resume cut keeps them (step 0)


@dataclass(frozen=True)
class Sweep:
    base: str  # experiment name or path, as config.load_experiment takes it
    grid: dict[str, tuple] = field(default_factory=dict)  # dotted key -> values; the cartesian product
    points: tuple[dict[str, object], ...] = ()  # explicit points, after the grid's
    overrides: tuple[str, ...] = ()  # "key=value" for every point
    name: str = ""  # default: the sweep file's stem


@dataclass(frozen=True)
class Run:
    name: str
    run_dir: Path
    overrides: tuple[str, ...]  # every --set of the point: the sweep's, the caller's, then its own
    hparams: dict  # every swept key -> its value in this run's config
    data: Path | None  # the shared prepared corpus, or None: the run prepares its own
    data_overrides: tuple[str, ...] = ()  # the --set of the first point with this corpus, which prepares it


# ---------------------------------------------------------------------------------------------- definition

def load_sweep(path: str | Path) -> Sweep:
    """`sweep()` of a sweep file, given as a path or as a name under experiments/sweeps/."""
    path = Path(path)
    if not path.suffix:
        path = EXPERIMENTS_DIR / "sweeps" / f"{path}.py"
    if not path.is_file():
        raise ConfigError(f"sweep file {str(path)!r} not found")
    spec = importlib.util.spec_from_file_location(f"llm_jax_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sweep = module.sweep() if hasattr(module, "sweep") else None
    if not isinstance(sweep, Sweep):
        raise ConfigError(f"sweep file {str(path)!r} must define sweep() returning llm_jax.sweep.Sweep")
    return sweep if sweep.name else dataclasses.replace(sweep, name=path.stem)


def expand(sweep: Sweep) -> list[dict]:
    """The points: the grid's cartesian product (in key order), then the explicit points."""
    keys = list(sweep.grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(sweep.grid[k] for k in keys))] if keys else []
    points += [dict(p) for p in sweep.points]
    if not points:
        raise ConfigError(f"sweep {sweep.name!r} has no points (an empty grid value, or no grid and no points)")
    return points


def plan(sweep: Sweep, sweep_dir: Path, extra_overrides=()) -> list[Run]:
    """Every point's run, its config validated; a bad key or value, or two points that make the same config,
    fail here, before anything runs."""
    base = load_experiment(sweep.base)
    common = [*sweep.overrides, *extra_overrides]
    validate(apply_overrides(base, common))
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
            cfg = validate(apply_overrides(base, list(overrides)))
        except ConfigError as e:
            raise ConfigError(f"sweep {sweep.name!r}, point {name}: {e}") from None
        if cfg in configs or any(r.name == name for r in runs):
            raise ConfigError(f"sweep {sweep.name!r}: points {configs.get(cfg, name)} and {name} are the same run")
        configs[cfg] = name
        hparams = {k: _hparam_value(cfg, k) for k in keys}
        data = _shared_data(cfg, Path(sweep_dir))
        runs.append(Run(name, Path(sweep_dir) / name, overrides, hparams, data, preparers.setdefault(data, overrides)))
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


def _shared_data(cfg: Config, sweep_dir: Path) -> Path | None:
    """Where this point's corpus is tokenized once for the sweep; None where the run must do it itself
    (SFT and preference data are prepared per run; an init_from run takes the export's tokenizer)."""
    if cfg.data.format != "text" or cfg.data.prepared or cfg.checkpoint.init_from:
        return None
    # The data section and the vocabulary decide the tokenized corpus (a superset of what prepare compares).
    key = json.dumps([to_dict(cfg.data), cfg.model.vocab_size], sort_keys=True)
    return sweep_dir / "data" / hashlib.sha256(key.encode()).hexdigest()[:12]


def train_args(sweep: Sweep, run: Run) -> list[str]:
    sets = [*run.overrides, *([f"data.prepared={run.data}"] if run.data else [])]
    return ["train", "--config", sweep.base, "--run-dir", str(run.run_dir), *_set_flags(sets)]


def prepare_args(sweep: Sweep, run: Run) -> list[str]:
    return ["prepare", "--config", sweep.base, "--out", str(run.data), *_set_flags(run.data_overrides)]


def _set_flags(overrides) -> list[str]:
    return [flag for item in overrides for flag in ("--set", item)]


def run_state(run: Run) -> str:
    if (run.run_dir / "results.json").exists():
        return "finished"
    steps = committed_steps(run.run_dir)
    if steps:
        return f"resume from step {steps[-1]}"
    if (run.run_dir / "config.json").exists():
        return "restart (an earlier attempt left no checkpoint: its directory is deleted)"
    return "new"


# ---------------------------------------------------------------------------------------------- HParams files

def write_experiment(sweep_dir: Path, runs: list[Run]) -> None:
    """The HParams experiment (swept keys with their values, the metrics) in SWEEP_DIR's own event file,
    rewritten in place so a sweep given more points shows them."""
    hparams = []
    for key in runs[0].hparams:
        values = {r.hparams[key] for r in runs}  # of the config field's type, so one type
        hparams.append(hp.HParam(key, hp.Discrete(values) if len({type(v) for v in values}) == 1 else None))
    summary = hp.hparams_config_pb(hparams, [hp.Metric(tag) for tag in METRICS])
    _write_events(sweep_dir / f"events.out.tfevents.0{_SESSION_SUFFIX}", summary)


def write_session(run: Run) -> None:
    """The run's HParams session start in RUN_DIR/tb, once: at step 0 in a file of its own, which the
    training Writer's resume cut (summaries past the resume step) leaves alone."""
    tb = run.run_dir / "tb"
    if not any(tb.glob(f"events.out.tfevents.*{_SESSION_SUFFIX}")):
        tb.mkdir(parents=True, exist_ok=True)
        summary = hp.hparams_pb(run.hparams, trial_id=run.name)
        _write_events(tb / f"events.out.tfevents.{int(time.time())}{_SESSION_SUFFIX}", summary)


def _write_events(path: Path, summary) -> None:
    temporary = path.with_name("." + path.name + ".tmp")  # no "tfevents" in a temporary name: readers skip it
    with open(temporary, "wb") as f:
        records = RecordWriter(f)
        records.write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString())
        records.write(event_pb2.Event(wall_time=time.time(), step=0, summary=summary).SerializeToString())
    os.replace(temporary, path)


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _write_sweep_dir(sweep: Sweep, sweep_dir: Path, runs: list[Run], todo: list[Run], states: dict,
                     extra_overrides) -> None:
    """sweep.json, the HParams experiment, and each run to start: its stale attempt gone, its session written."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    definition = {"name": sweep.name, "base": sweep.base, "grid": {k: list(v) for k, v in sweep.grid.items()},
                  "points": [dict(p) for p in sweep.points], "overrides": list(sweep.overrides),
                  "extra_overrides": list(extra_overrides), "swept": list(runs[0].hparams),
                  "runs": [{"name": r.name, "run_dir": str(r.run_dir), "overrides": list(r.overrides),
                            "hparams": r.hparams} for r in runs]}
    _write_atomic(sweep_dir / "sweep.json", json.dumps(definition, indent=2, default=str) + "\n")
    write_experiment(sweep_dir, runs)
    for run in todo:
        if states[run.name].startswith("restart"):
            shutil.rmtree(run.run_dir)
        write_session(run)


# ---------------------------------------------------------------------------------------------- launching

def run_sweep(path: str | Path, launcher: str = "local", *, sweep_dir: Path | None = None, dry_run: bool = False,
              parallel: int = 1, launcher_options: dict | None = None, extra_overrides=()) -> int:
    """Runs (or with dry_run prints) every unfinished point; 0 if all went well, 75 if interrupted (run the
    same sweep again to go on), 1 if any failed (the others still ran). Local sweeps end with the report."""
    sweep = load_sweep(path)
    if launcher not in LAUNCHERS:
        raise launch.LaunchError(f"launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    if parallel < 1 or (parallel > 1 and launcher != "local"):
        raise launch.LaunchError(f"parallel={parallel}: at least 1, and more only with the local launcher")
    sweep_dir = Path(sweep_dir or Path("runs") / "sweeps" / sweep.name)
    runs = plan(sweep, sweep_dir, extra_overrides)
    options = _options(launcher, launcher_options, sweep_dir, dry_run)
    states = {run.name: run_state(run) for run in runs}
    todo = [run for run in runs if states[run.name] != "finished"]
    print(f"sweep {sweep.name}: {len(runs)} runs in {sweep_dir}, {len(runs) - len(todo)} finished "
          f"(skipped), launcher {launcher}{' (dry run: nothing runs, nothing is written)' if dry_run else ''}")
    for run in runs:
        print(f"  {run.name}: {states[run.name]}   [{run.run_dir}]")
    if not dry_run:
        _write_sweep_dir(sweep, sweep_dir, runs, todo, states, extra_overrides)
    failed = _LAUNCH[launcher](sweep, todo, options, dry_run, parallel)
    return _summarise(sweep_dir, failed, local=launcher.startswith("local"), dry_run=dry_run)


def _options(launcher: str, given: dict | None, sweep_dir: Path, dry_run: bool) -> dict:
    """The launcher's keyword options (None values dropped: the default), checked by name."""
    defaults = {"local-multiprocess": {"num_processes": 2, "devices_per_process": 1},
                "slurm": {"nodes": 1, "gpus_per_node": 8, "log_dir": str(sweep_dir / "slurm")}}.get(launcher, {})
    options = {**defaults, **{k: v for k, v in (given or {}).items() if v is not None}}
    builder = {"local-multiprocess": launch.run_multiprocess, "slurm": launch.slurm_script,
               "tpu": launch.tpu_commands}.get(launcher)
    params = {n: p for n, p in inspect.signature(builder).parameters.items()
              if n not in ("args", "job_name")} if builder else {}
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise launch.LaunchError(f"launcher {launcher} takes no option {', '.join(unknown)} "
                                 f"(it takes: {', '.join(params) or 'none'})")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in options]
    if missing:
        raise launch.LaunchError(f"launcher {launcher} needs {', '.join(missing)}")
    tool = {"slurm": "sbatch", "tpu": "gcloud"}.get(launcher)
    if tool and not dry_run and not shutil.which(tool):
        raise launch.LaunchError(f"{tool} is not on PATH: run the sweep where it is, or print it with dry_run")
    return options


def _show(run: Run, lines: list[str]) -> None:
    print(f"{run.name}:\n" + "\n".join(f"  {line}" for line in lines))


def _prepare_once(sweep: Sweep, todo: list[Run], dry_run: bool) -> int:
    """Tokenizes each shared corpus the unfinished runs need and no earlier sweep left; 0 or the failed status."""
    firsts = {}
    for run in todo:
        if run.data and not (run.data / "meta.json").exists():
            firsts.setdefault(run.data, run)
    for run in firsts.values():
        args = prepare_args(sweep, run)
        if dry_run:
            print(f"shared data {run.data}:\n  {shlex.join(launch.local_command(args))}")
        elif status := launch.run_local(args):
            return status
    return 0


def _launch_local(sweep: Sweep, todo: list[Run], options: dict, dry_run: bool, parallel: int) -> dict:
    if status := _prepare_once(sweep, todo, dry_run):
        return {run.name: status for run in todo}
    if dry_run:
        for run in todo:
            _show(run, [shlex.join(launch.local_command(train_args(sweep, run)))])
        return {}
    if parallel > 1:
        return _run_parallel(sweep, todo, parallel)
    return _one_after_another(todo, lambda run: launch.run_local(train_args(sweep, run)))


def _launch_multiprocess(sweep: Sweep, todo: list[Run], options: dict, dry_run: bool, parallel: int) -> dict:
    if status := _prepare_once(sweep, todo, dry_run):
        return {run.name: status for run in todo}
    if dry_run:
        port = options.get("port") or launch.free_port()
        for run in todo:
            commands = launch.multiprocess_commands(train_args(sweep, run), options["num_processes"],
                                                    options["devices_per_process"], port)
            _show(run, [shlex.join([f"{k}={v}" for k, v in env.items()] + argv) for env, argv in commands])
        return {}
    return _one_after_another(todo, lambda run: launch.run_multiprocess(train_args(sweep, run), **options))


def _one_after_another(todo: list[Run], start) -> dict:
    """Runs each point in turn; a failure does not stop the others, an interruption (Ctrl-C) does."""
    failed = {}
    for run in todo:
        print(f"=== {run.name}", flush=True)
        status = start(run)
        if status:
            failed[run.name] = status
        if status in INTERRUPTED:
            break
    return failed


def _run_parallel(sweep: Sweep, todo: list[Run], parallel: int) -> dict:
    """Up to `parallel` local runs at once, each writing its output to RUN_DIR/train.log."""
    waiting, active, failed = list(todo), {}, {}
    try:
        while waiting or active:
            while waiting and len(active) < parallel and not set(failed.values()) & set(INTERRUPTED):
                run = waiting.pop(0)
                log = open(run.run_dir / "train.log", "ab")
                argv = launch.local_command(train_args(sweep, run))
                active[run.name] = (subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log)
                print(f"started {run.name} (output: {run.run_dir / 'train.log'})", flush=True)
            if not active:
                break
            time.sleep(0.5)
            for name, (process, log) in list(active.items()):
                if process.poll() is not None:
                    log.close()
                    del active[name]
                    print(f"{name}: {'done' if process.returncode == 0 else f'exit status {process.returncode}'}",
                          flush=True)
                    if process.returncode:
                        failed[name] = process.returncode
    finally:  # Ctrl-C: the runs got it too and save a checkpoint; wait for them, then end any that hang
        for process, log in active.values():
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
            log.close()
    return failed


def _slurm_script(sweep: Sweep, run: Run, options: dict) -> str:
    setup = options.get("setup", "").strip()
    if run.data:  # concurrent jobs may all tokenize: the first to finish publishes, the others use its copy
        setup = "\n".join(filter(None, [setup, shlex.join(["llm-jax", *prepare_args(sweep, run)])]))
    return launch.slurm_script(train_args(sweep, run), job_name=f"{sweep.name}.{run.name}",
                               **{**options, "setup": setup})


def _launch_slurm(sweep: Sweep, todo: list[Run], options: dict, dry_run: bool, parallel: int) -> dict:
    failed = {}
    for run in todo:
        script = _slurm_script(sweep, run, options)
        if dry_run:
            _show(run, script.splitlines())
            continue
        path = run.run_dir.parent / "slurm" / f"{run.name}.sbatch"
        for folder in (path.parent, Path(options["log_dir"])):  # SLURM does not create the --output directory
            folder.mkdir(parents=True, exist_ok=True)
        path.write_text(script)
        if status := subprocess.run(["sbatch", str(path)]).returncode:
            failed[run.name] = status
    return failed


def _launch_tpu(sweep: Sweep, todo: list[Run], options: dict, dry_run: bool, parallel: int) -> dict:
    """Each point's gcloud commands in turn; a command an earlier point already ran (creating the slice,
    copying the code, tokenizing the shared corpus) is not repeated."""
    done, failed = set(), {}
    for run in todo:
        steps = ([prepare_args(sweep, run)] if run.data else []) + [train_args(sweep, run)]
        commands = [c for c in dict.fromkeys(c for args in steps for c in launch.tpu_commands(args, **options))
                    if c not in done]
        done.update(commands)
        if dry_run:
            _show(run, commands)
            continue
        print(f"=== {run.name}", flush=True)
        for command in commands:
            if status := subprocess.run(command, shell=True).returncode:
                failed[run.name] = status
                break
    return failed


_LAUNCH = {"local": _launch_local, "local-multiprocess": _launch_multiprocess, "slurm": _launch_slurm,
           "tpu": _launch_tpu}


def _summarise(sweep_dir: Path, failed: dict, local: bool, dry_run: bool) -> int:
    for name, code in failed.items():
        print(f"failed: {name} (exit status {code})", file=sys.stderr)
    if local and not dry_run:  # the runs are over: report them
        from llm_jax.report import write_report  # matplotlib is needed only here
        print(f"report: {write_report(sweep_dir)}")
    elif not dry_run:
        print(f"when the runs are over: llm-jax report {sweep_dir}")
    if not failed:
        return 0
    return 75 if set(failed.values()) & set(INTERRUPTED) else 1
