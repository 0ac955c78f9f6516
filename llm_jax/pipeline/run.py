"""Running a pipeline (plan.py): its stages in order through a launcher, then the report card (card.py).

Each training stage is `llm-jax train` (through the launcher) then `llm-jax export` into RUN_DIR/export; a stage
whose export exists is finished and skipped, one with results.json is only exported, any other runs the same
`train` again, which resumes from its latest checkpoint. So the same command after a kill at any moment goes
on where it stopped and redoes nothing finished. A Comparisons stage writes its pairs.jsonl whole or not at all.

Launchers: `local` and `local-multiprocess` run here; `slurm` submits each stage's training with `sbatch
--wait` (one job at a time, in order) and exports here, on the shared file system; `tpu` runs each stage's
training and export commands on the slice in turn (the runs live on the workers, so the card is not made here).
PIPELINE_DIR/pipeline.json records the stages, their state and the wall time spent on each.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from llm_jax.atomic import write_atomic
from llm_jax.errors import PREEMPTED_EXIT, ConfigError
from llm_jax.launch.local import local_command, run_local, run_multiprocess
from llm_jax.launch.slurm import slurm_script
from llm_jax.launch.tpu import tpu_commands
from llm_jax.pipeline.plan import Comparisons, Planned, describe, load_pipeline, plan, with_overrides
from llm_jax.sweep.run import INTERRUPTED, check_options


def stage_state(item: Planned) -> str:
    from llm_jax.train.checkpoint import committed_steps
    if isinstance(item.stage, Comparisons):
        return "finished" if (item.run_dir / "pairs.jsonl").exists() else "new"
    if (item.export / "config.json").exists():
        return "finished"
    if (item.run_dir / "results.json").exists():
        return "trained: export"
    steps = committed_steps(item.run_dir)
    return f"resume from step {steps[-1]}" if steps else "new"


def check_unchanged(name: str, item: Planned) -> None:
    """A ConfigError unless a stage that has started trained with the config planned now: a finished stage would
    be skipped with its old results, an unfinished one refused by `train`."""
    from llm_jax.train.setup import saved_differences
    if item.cfg is None or not (item.run_dir / "config.json").exists():
        return
    changed = saved_differences(item.run_dir, item.cfg)
    if changed:
        raise ConfigError(f"pipeline {name}, stage {item.stage.name}: {item.run_dir} trained with another config "
                          f"({'; '.join(changed[:2])}{'; ...' if len(changed) > 2 else ''}); delete it, and the "
                          "stages after it, to train it again")


def train_args(item: Planned) -> list[str]:
    return ["train", "--config", item.stage.experiment, "--run-dir", str(item.run_dir),
            *[flag for o in item.overrides for flag in ("--set", o)]]


def export_args(item: Planned) -> list[str]:
    return ["export", "--run-dir", str(item.run_dir), "--out", str(item.export)]


def run_pipeline(path: str | Path, launcher: str = "local", *, pipeline_dir: Path | None = None,
                 dry_run: bool = False, overrides=(), launcher_options: dict | None = None) -> int:
    """Runs (or with dry_run prints) every unfinished stage in order, then writes the report card; 0 when all
    finished, 75 if interrupted (run the same command again to go on), else the failed stage's status."""
    pipeline = with_overrides(load_pipeline(path), list(overrides))
    # Absolute: the wiring's paths are saved in each stage's config, which a re-run from elsewhere compares.
    pipeline_dir = Path(pipeline_dir or Path("runs") / "pipelines" / pipeline.name).absolute()
    items, held = plan(pipeline, pipeline_dir)
    for item in items:
        check_unchanged(pipeline.name, item)
    options = check_options(launcher, launcher_options, pipeline_dir, dry_run)
    states = {item.stage.name: stage_state(item) for item in items}
    print(f"pipeline {pipeline.name}: {len(items)} stages in {pipeline_dir}, launcher {launcher}"
          f"{' (dry run: nothing runs, nothing is written)' if dry_run else ''}")
    for item in items:
        print(f"  {item.stage.name} ({describe(item)}): {states[item.stage.name]}   [{item.run_dir}]")
    for name, why in held.items():
        print(f"  {name}: held, {why}")
    for stage in pipeline.stages:
        if not stage.enabled:
            print(f"  {stage.name}: off (--set {stage.name}.enabled=true)")
    record = _record(pipeline_dir, pipeline.name, items)
    for item in items:
        name = item.stage.name
        if states[name] == "finished":
            continue
        if dry_run:
            _show(item, launcher, options)
            continue
        print(f"=== {name}", flush=True)
        start = time.perf_counter()
        try:
            status = _run_stage(item, launcher, options, states[name])
        finally:
            record["wall_s"][name] = record["wall_s"].get(name, 0.0) + time.perf_counter() - start
            record["state"][name] = stage_state(item)
            write_atomic(pipeline_dir / "pipeline.json", json.dumps(record, indent=2) + "\n")
        if status:
            print(f"pipeline {pipeline.name}: stage {name} ended with exit status {status}; run the same command "
                  "again to go on", file=sys.stderr)
            return PREEMPTED_EXIT if status in INTERRUPTED else status
    if dry_run:
        return 0
    if launcher == "tpu":
        print("the runs are on the TPU workers: make the card there with `llm-jax pipeline ... --launcher local`")
        return 0
    from llm_jax.pipeline.card import write_card  # matplotlib and the evaluations are needed only here
    print(f"report card: {write_card(pipeline, items, pipeline_dir, record, held)}")
    return 0


def _record(pipeline_dir: Path, name: str, items: list[Planned]) -> dict:
    """pipeline.json as an earlier invocation left it (its wall times are added to), with this plan's stages."""
    path = pipeline_dir / "pipeline.json"
    record = json.loads(path.read_text()) if path.exists() else {"wall_s": {}}
    record.update(name=name, stages=[{"name": i.stage.name, "experiment": getattr(i.stage, "experiment", None),
                                      "overrides": list(i.overrides)} for i in items],
                  state={i.stage.name: stage_state(i) for i in items})
    return record


def _run_stage(item: Planned, launcher: str, options: dict, state: str) -> int:
    item.run_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(item.stage, Comparisons):
        from llm_jax.pipeline.card import write_comparisons
        write_comparisons(item)
        return 0
    if state != "trained: export":
        if launcher == "local":
            status = run_local(train_args(item))
        elif launcher == "local-multiprocess":
            status = run_multiprocess(train_args(item), **options)
        elif launcher == "slurm":
            status = _sbatch_wait(item, options)
        else:
            return _tpu(item, options)
        if status:
            return status
    return run_local(export_args(item))


def _sbatch_wait(item: Planned, options: dict) -> int:
    path = item.run_dir / "train.sbatch"
    Path(options["log_dir"]).mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output directory
    path.write_text(slurm_script(train_args(item), job_name=f"pipeline.{item.stage.name}", **options))
    job = subprocess.Popen(["sbatch", "--wait", "--parsable", str(path)], stdout=subprocess.PIPE, text=True)
    job_id = (job.stdout.readline().strip().split(";")[0]) if job.stdout else ""
    try:
        return job.wait()
    except KeyboardInterrupt:  # the job would go on without its driver, and a re-run would start a second one
        if job_id:
            subprocess.run(["scancel", "--signal=TERM", job_id])  # llm-jax saves a checkpoint on SIGTERM
        raise


def _tpu(item: Planned, options: dict) -> int:
    commands = [c for args in (train_args(item), export_args(item)) for c in tpu_commands(args, **options)]
    for command in dict.fromkeys(commands):  # the slice's set-up, once
        if status := subprocess.run(command, shell=True).returncode:
            return status
    return 0


def _show(item: Planned, launcher: str, options: dict) -> None:
    if isinstance(item.stage, Comparisons):
        lines = [f"(here) answers of {item.stage.policy} and {item.stage.baseline} judged by {item.stage.judge} "
                 f"-> {item.run_dir / 'pairs.jsonl'}"]
    elif launcher == "slurm":
        lines = slurm_script(train_args(item), job_name=f"pipeline.{item.stage.name}", **options).splitlines()
        lines += [shlex.join(local_command(export_args(item)))]
    elif launcher == "tpu":
        lines = [c for args in (train_args(item), export_args(item)) for c in tpu_commands(args, **options)]
    else:
        lines = [shlex.join(local_command(args)) for args in (train_args(item), export_args(item))]
    print(f"{item.stage.name}:\n" + "\n".join(f"  {line}" for line in lines))

