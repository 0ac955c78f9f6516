"""Running a sweep (plan.py): every unfinished point on one launcher of llm_jax/launch/, then the report.

`local` runs the points one after another (or `parallel` at a time, each logging to RUN_DIR/train.log);
`local-multiprocess` runs each as one job of several CPU processes; `slurm` writes SWEEP_DIR/slurm/<run>.sbatch
per point and submits it; `tpu` runs each point's gcloud commands in turn on one slice. A failed point does
not stop the others; Ctrl-C does. Finished, resumed and restarted are judged from SWEEP_DIR as this machine
sees it: on a TPU slice the runs live on the workers, where a plain `train` resumes by itself.

Shared data is prepared once: locally before the runs; on SLURM at the start of every job, where the first to
finish publishes it; on a TPU slice before the first run that needs it.

SWEEP_DIR/sweep.json records the sweep and its runs (report.py reads it); hparams.py writes the HParams
experiment beside it and each run's session.
"""
from __future__ import annotations

import inspect
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from llm_jax.atomic import write_atomic
from llm_jax.errors import PREEMPTED_EXIT, LaunchError
from llm_jax.launch.local import (free_port, local_command, multiprocess_commands, process_lines, run_local,
                                  run_multiprocess)
from llm_jax.launch.slurm import slurm_script
from llm_jax.launch.tpu import tpu_commands
from llm_jax.sweep.hparams import write_experiment, write_session
from llm_jax.sweep.plan import RESTART_AFRESH, Run, Sweep, load_sweep, plan, prepare_args, run_state, train_args

LAUNCHERS = ("local", "local-multiprocess", "slurm", "tpu")
INTERRUPTED = (PREEMPTED_EXIT, 130)  # a run preempted by Ctrl-C/SIGTERM (checkpoint saved) or killed by Ctrl-C


def run_sweep(path: str | Path, launcher: str = "local", *, sweep_dir: Path | None = None, dry_run: bool = False,
              parallel: int = 1, launcher_options: dict | None = None, extra_overrides=()) -> int:
    """Runs (or with dry_run prints) every unfinished point; 0 if all went well, 75 if interrupted (run the
    same sweep again to go on), 1 if any failed (the others still ran). Local sweeps end with the report."""
    sweep = load_sweep(path)
    if launcher not in LAUNCHERS:
        raise LaunchError(f"launcher {launcher!r}: choose one of {', '.join(LAUNCHERS)}")
    if parallel < 1 or (parallel > 1 and launcher != "local"):
        raise LaunchError(f"parallel={parallel}: at least 1, and more only with the local launcher")
    sweep_dir = Path(sweep_dir or Path("runs") / "sweeps" / sweep.name)
    runs = plan(sweep, sweep_dir, extra_overrides)
    options = check_options(launcher, launcher_options, sweep_dir, dry_run)
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


def _write_sweep_dir(sweep: Sweep, sweep_dir: Path, runs: list[Run], todo: list[Run], states: dict,
                     extra_overrides) -> None:
    """sweep.json, the HParams experiment, and each run to start: another config's attempt gone, its session
    written."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    definition = {"name": sweep.name, "base": sweep.base, "grid": {k: list(v) for k, v in sweep.grid.items()},
                  "points": [dict(p) for p in sweep.points], "overrides": list(sweep.overrides),
                  "extra_overrides": list(extra_overrides), "swept": list(runs[0].hparams),
                  "runs": [{"name": r.name, "run_dir": str(r.run_dir), "overrides": list(r.overrides),
                            "hparams": r.hparams} for r in runs]}
    write_atomic(sweep_dir / "sweep.json", json.dumps(definition, indent=2, default=str) + "\n")
    write_experiment(sweep_dir, runs)
    for run in todo:
        if states[run.name] == RESTART_AFRESH:
            shutil.rmtree(run.run_dir)
        write_session(run)


def check_options(launcher: str, given: dict | None, sweep_dir: Path, dry_run: bool) -> dict:
    """The launcher's keyword options (None values dropped: the default), checked by name (sweeps and
    pipelines; SLURM logs go under sweep_dir)."""
    defaults = {"local-multiprocess": {"num_processes": 2, "devices_per_process": 1},
                "slurm": {"nodes": 1, "gpus_per_node": 8, "log_dir": str(sweep_dir / "slurm")}}.get(launcher, {})
    options = {**defaults, **{k: v for k, v in (given or {}).items() if v is not None}}
    builder = {"local-multiprocess": run_multiprocess, "slurm": slurm_script, "tpu": tpu_commands}.get(launcher)
    params = {n: p for n, p in inspect.signature(builder).parameters.items()
              if n not in ("args", "job_name")} if builder else {}
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise LaunchError(f"launcher {launcher} takes no option {', '.join(unknown)} "
                          f"(it takes: {', '.join(params) or 'none'})")
    missing = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in options]
    if missing:
        raise LaunchError(f"launcher {launcher} needs {', '.join(missing)}")
    tool = {"slurm": "sbatch", "tpu": "gcloud"}.get(launcher)
    if tool and not dry_run and not shutil.which(tool):
        raise LaunchError(f"{tool} is not on PATH: run it where it is, or print it with --dry-run")
    return options


def _show(run: Run, lines: list[str]) -> None:
    print(f"{run.name}:\n" + "\n".join(f"  {line}" for line in lines))


def _prepare_once(sweep: Sweep, todo: list[Run], dry_run: bool) -> int:
    """Prepares the shared data the unfinished runs need and no earlier sweep left; 0 or the failed status."""
    firsts = {}
    for run in todo:
        if run.data and not (run.data / "meta.json").exists():
            firsts.setdefault(run.data, run)
    for run in firsts.values():
        args = prepare_args(sweep, run)
        if dry_run:
            print(f"shared data {run.data}:\n  {shlex.join(local_command(args))}")
        elif status := run_local(args):
            return status
    return 0


def _launch_local(sweep: Sweep, todo: list[Run], options: dict, dry_run: bool, parallel: int) -> dict:
    if status := _prepare_once(sweep, todo, dry_run):
        return {run.name: status for run in todo}
    if dry_run:
        for run in todo:
            _show(run, [shlex.join(local_command(train_args(sweep, run)))])
        return {}
    if parallel > 1:
        return _run_parallel(sweep, todo, parallel)
    return _one_after_another(todo, lambda run: run_local(train_args(sweep, run)))


def _launch_multiprocess(sweep: Sweep, todo: list[Run], options: dict, dry_run: bool, parallel: int) -> dict:
    if status := _prepare_once(sweep, todo, dry_run):
        return {run.name: status for run in todo}
    if dry_run:
        port = options.get("port") or free_port()
        for run in todo:
            commands = multiprocess_commands(train_args(sweep, run), options["num_processes"],
                                             options["devices_per_process"], port)
            _show(run, process_lines(commands))
        return {}
    return _one_after_another(todo, lambda run: run_multiprocess(train_args(sweep, run), **options))


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
                argv = local_command(train_args(sweep, run))
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
    if run.data:  # concurrent jobs may all prepare: the first to finish publishes, the others use its copy
        setup = "\n".join(filter(None, [setup, shlex.join(["llm-jax", *prepare_args(sweep, run)])]))
    return slurm_script(train_args(sweep, run), job_name=f"{sweep.name}.{run.name}", **{**options, "setup": setup})


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
    copying the code, preparing the shared data) is not repeated."""
    done, failed = set(), {}
    for run in todo:
        steps = ([prepare_args(sweep, run)] if run.data else []) + [train_args(sweep, run)]
        commands = [c for c in dict.fromkeys(c for args in steps for c in tpu_commands(args, **options))
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
        from llm_jax.sweep.report import write_report  # matplotlib is needed only here
        print(f"report: {write_report(sweep_dir)}")
    elif not dry_run:
        print(f"when the runs are over: llm-jax report {sweep_dir}")
    if not failed:
        return 0
    return PREEMPTED_EXIT if set(failed.values()) & set(INTERRUPTED) else 1
