"""The `slurm` launcher: writes an sbatch script and submits it with sbatch (--out FILE keeps a copy).

--tasks node: one process per node driving all its GPUs; --tasks gpu: one process per GPU. Every process runs
`srun llm-jax ARGS`; jax.distributed.initialize() finds the others from SLURM's variables. llm-jax must be on
PATH in the job (--setup 'source .venv/bin/activate', or an active environment at submission: sbatch passes
it on) with a CUDA jax (`pip install -e . "jax[cuda12]"`), and --run-dir on a file system all nodes share.

--requeue: a run preempted after saving its checkpoint (exit 75) puts its job back in the queue with
`scontrol requeue`, and the requeued job resumes from that checkpoint.

slurm_script is a pure builder, for sweeps too.
"""
from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from llm_jax.errors import PREEMPTED_EXIT, LaunchError
from llm_jax.launch.local import check_positive


def slurm_script(args: list[str], *, job_name: str, nodes: int, gpus_per_node: int, tasks: str = "node",
                 time: str = "24:00:00", partition: str | None = None, account: str | None = None,
                 log_dir: str = "slurm_logs", setup: str = "", cpus_per_task: int | None = None,
                 requeue: bool = False) -> str:
    """A complete sbatch script running `srun llm-jax ARGS` with one process per node or per GPU; with
    `requeue`, a run that exits PREEMPTED_EXIT puts its job back in the queue, to resume from its checkpoint."""
    check_positive(nodes=nodes, gpus_per_node=gpus_per_node)
    if cpus_per_task is not None:
        check_positive(cpus_per_task=cpus_per_task)
    if tasks not in ("node", "gpu"):
        raise LaunchError(f"--tasks={tasks!r}: choose node (one process per node) or gpu (one per GPU)")
    options = {"job-name": job_name, "nodes": nodes, "ntasks-per-node": 1 if tasks == "node" else gpus_per_node,
               "gpus-per-node": gpus_per_node, "cpus-per-task": cpus_per_task, "time": time,
               "partition": partition, "account": account, "output": f"{log_dir}/%x-%j.out"}
    lines = ["#!/bin/bash"] + [_sbatch_line(key, value) for key, value in options.items() if value is not None]
    lines += ["# SIGTERM 5 minutes before the time limit: llm-jax saves a checkpoint and exits 75;",
              "# submitting the same script again resumes.",
              "#SBATCH --signal=TERM@300"]
    if requeue:
        lines += ["# --requeue: the job may go back in the queue (scontrol requeue below), keeping its id; each run",
                  "# appends to the log rather than truncating the earlier runs' output.",
                  "#SBATCH --requeue",
                  "#SBATCH --open-mode=append"]
    lines += ["set -euo pipefail"]
    lines += [setup.strip()] if setup.strip() else []
    # Since SLURM 22.05 srun no longer inherits --cpus-per-task from sbatch: repeat it.
    srun = ["srun"] + ([f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else [])
    if tasks == "node":
        lines += ["# One process per node drives all GPUs of its node. JAX's SLURM detection assumes one process",
                  "# per GPU and would give each process only GPU number SLURM_LOCALID: list them all instead.",
                  "export JAX_LOCAL_DEVICE_IDS=" + ",".join(map(str, range(gpus_per_node)))]
    else:
        lines += ["# One process per GPU: JAX's SLURM detection gives each process the GPU numbered SLURM_LOCALID",
                  "# among those it sees, so every process must see all GPUs of its node (no per-task binding)."]
        srun.append("--gpu-bind=none")
    lines += ["# jax.distributed.initialize() finds the job from what srun sets (SLURM_STEP_NODELIST, SLURM_NTASKS,",
              "# SLURM_PROCID). No --kill-on-bad-exit: after SIGTERM each process exits 75 once the checkpoint is",
              "# saved, and ending the others at the first exit could cut their save short; a process that",
              "# crashes is noticed by the others through jax.distributed's heartbeats."]
    command = srun + ["llm-jax", *args]
    lines += _requeue_on_preemption(command) if requeue else [shlex.join(command)]
    return "\n".join(lines) + "\n"


def _requeue_on_preemption(argv: list[str]) -> list[str]:
    """Shell lines running argv and requeueing the job when it exits PREEMPTED_EXIT, else exiting with its status."""
    return [f"# Exit status {PREEMPTED_EXIT}: the run saved a checkpoint after SIGTERM (the time limit, a preemption).",
            "# Requeue the job, and this same script resumes from that checkpoint. `|| status=$?` reads the",
            "# status without set -e ending the script first.",
            "status=0",
            shlex.join(argv) + " || status=$?",
            f'if [ "$status" -eq {PREEMPTED_EXIT} ]; then',
            '  scontrol requeue "$SLURM_JOB_ID"',
            "  exit 0",
            "fi",
            'exit "$status"']


def launch_slurm(opts, args: list[str]) -> int:
    """`launch slurm`: prints the script (--dry-run) or submits it; returns sbatch's exit status."""
    script = slurm_script(args, job_name=opts.job_name or _job_name(args), nodes=opts.nodes,
                          gpus_per_node=opts.gpus_per_node, tasks=opts.tasks, time=opts.time,
                          partition=opts.partition, account=opts.account, log_dir=opts.log_dir,
                          setup=opts.setup, cpus_per_task=opts.cpus_per_task, requeue=opts.requeue)
    sbatch = shutil.which("sbatch")
    if not (opts.dry_run or sbatch):
        raise LaunchError("sbatch is not on PATH: submit from a SLURM login node, or write the script with "
                          "--dry-run / --out FILE")
    if opts.out:
        Path(opts.out).write_text(script)
    if opts.dry_run:
        print(script, end="")
        return 0
    Path(opts.log_dir).mkdir(parents=True, exist_ok=True)  # SLURM does not create the --output directory
    if opts.out:
        return subprocess.run([sbatch, opts.out]).returncode
    return subprocess.run([sbatch], input=script, text=True).returncode


def _sbatch_line(key: str, value) -> str:
    # sbatch splits #SBATCH lines at whitespace, so a value cannot contain any.
    if not str(value) or any(c.isspace() for c in str(value)):
        raise LaunchError(f"--{key}={str(value)!r}: SLURM needs a non-empty value without spaces")
    return f"#SBATCH --{key}={value}"


def _job_name(args: list[str]) -> str:
    """The experiment's name from `--config X` (a file or a name), else llm-jax."""
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return Path(args[i + 1]).stem
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1]).stem
    return "llm-jax"
