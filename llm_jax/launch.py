"""Launchers: the same `llm-jax` command line on this machine, on several local processes, on a SLURM GPU
cluster or on a Cloud TPU VM slice.

    python -m llm_jax.launch KIND [options] [--dry-run] -- LLM_JAX_ARGS...
    launch/KIND [options] [--dry-run] -- train --config pretrain_tiny --run-dir runs/x --set model.n_layers=2

  local               one process with all of this machine's devices in one mesh: plain `llm-jax ARGS`.
  local-multiprocess  --num-processes N CPU processes on this machine, each with --devices-per-process K fake
                      devices, joined by jax.distributed (`--coordinator 127.0.0.1:PORT --num-processes N
                      --process-id I`): the multi-host code path on a laptop. Process 0's output is shown; the
                      others' only if one fails (its last lines). Takes `train` only, the command with those flags.
  slurm               writes an sbatch script and submits it with sbatch (--out FILE keeps a copy). --tasks node:
                      one process per node driving all its GPUs; --tasks gpu: one process per GPU. Every process
                      runs `srun llm-jax ARGS`; jax.distributed.initialize() finds the others from SLURM's
                      variables. llm-jax must be on PATH in the job (--setup 'source .venv/bin/activate', or an
                      active environment at submission: sbatch passes it on) with a CUDA jax (`pip install -e .
                      "jax[cuda12]"`), and --run-dir on a file system all nodes share.
  tpu                 gcloud commands: copy the code to every worker of a TPU VM slice (scp of a checkout, or git
                      clone of a URL), install it with jax[tpu], then start the same command on all workers at
                      once, as a pod needs (jax.distributed.initialize() reads the TPU metadata); with --queued,
                      first request the slice as a queued resource and wait until it is ACTIVE. The run lasts as
                      long as the ssh session; run the same launch again to resume from the last checkpoint.

--dry-run prints what would run (per process the environment additions and the argv; the sbatch script; the
gcloud command lines) and exits. Bad input is one line on stderr and exit status 2; otherwise the status is
the launched command's (75: preempted after saving a checkpoint; the same command resumes).

For sweeps: local_command, multiprocess_commands, slurm_script and tpu_commands are pure builders;
run_local and run_multiprocess start the processes and return an exit status.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
_PREEMPTED_EXIT = 75  # llm_jax.preemption.PREEMPTED_EXIT, not imported: that module imports jax
# Stock TPU VM images are Ubuntu 22.04 with Python 3.10; jax 0.10 and llm_jax need 3.11, so the default
# setup makes (once) and activates a Python 3.11 virtual environment on every worker.
TPU_SETUP = ("test -x ~/llm_jax_venv/bin/pip || { sudo apt-get -qq update && sudo apt-get -qq install -y "
             "python3.11-venv && python3.11 -m venv ~/llm_jax_venv; } && . ~/llm_jax_venv/bin/activate")
# Google's TPU VM images for JAX by TPU generation (cloud.google.com/tpu/docs/runtimes); v4 and older: the last.
_TPU_RUNTIMES = (("v6e", "v2-alpha-tpuv6e"), ("v5p", "v2-alpha-tpuv5"), ("v5litepod", "v2-alpha-tpuv5-lite"),
                 ("v5e", "v2-alpha-tpuv5-lite"), ("", "tpu-ubuntu2204-base"))


class LaunchError(ValueError):
    """Bad launcher input, reported in one line with exit status 2."""


def local_command(args: list[str]) -> list[str]:
    """`llm-jax ARGS` under this interpreter, whose environment has llm_jax installed."""
    return [sys.executable, "-m", "llm_jax", *args]


def multiprocess_commands(args: list[str], num_processes: int, devices_per_process: int,
                          port: int) -> list[tuple[dict[str, str], list[str]]]:
    """(environment additions, argv) of each process of a CPU job of `num_processes` on this machine.

    XLA_FLAGS holds only the device count here; run_multiprocess appends it to the caller's XLA_FLAGS at run
    time (replacing any other device count), so the caller's other XLA flags still apply.
    """
    _check_positive(num_processes=num_processes, devices_per_process=devices_per_process)
    if not 0 < port < 65536:
        raise LaunchError(f"--port={port} is not a TCP port (1..65535)")
    if not args or args[0] != "train":
        raise LaunchError(f"local-multiprocess runs `train ...` (the command that joins processes), "
                          f"not `{shlex.join(args[:1])}`")
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{_DEVICE_COUNT_FLAG}={devices_per_process}"}
    return [(dict(env), local_command(args) + ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                               str(num_processes), "--process-id", str(i)])
            for i in range(num_processes)]


def slurm_script(args: list[str], *, job_name: str, nodes: int, gpus_per_node: int, tasks: str = "node",
                 time: str = "24:00:00", partition: str | None = None, account: str | None = None,
                 log_dir: str = "slurm_logs", setup: str = "", cpus_per_task: int | None = None) -> str:
    """A complete sbatch script running `srun llm-jax ARGS` with one process per node or per GPU."""
    _check_positive(nodes=nodes, gpus_per_node=gpus_per_node)
    if cpus_per_task is not None:
        _check_positive(cpus_per_task=cpus_per_task)
    if tasks not in ("node", "gpu"):
        raise LaunchError(f"--tasks={tasks!r}: choose node (one process per node) or gpu (one per GPU)")
    options = {"job-name": job_name, "nodes": nodes, "ntasks-per-node": 1 if tasks == "node" else gpus_per_node,
               "gpus-per-node": gpus_per_node, "cpus-per-task": cpus_per_task, "time": time,
               "partition": partition, "account": account, "output": f"{log_dir}/%x-%j.out"}
    lines = ["#!/bin/bash"] + [_sbatch_line(key, value) for key, value in options.items() if value is not None]
    lines += ["# SIGTERM 5 minutes before the time limit: llm-jax saves a checkpoint and exits 75;",
              "# submitting the same script again resumes.",
              "#SBATCH --signal=TERM@300",
              "set -euo pipefail"]
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
              "# crashes is noticed by the others through jax.distributed's heartbeats.",
              shlex.join(srun + ["llm-jax", *args])]
    return "\n".join(lines) + "\n"


def tpu_commands(args: list[str], *, tpu_name: str, zone: str, project: str | None = None,
                 accelerator_type: str | None = None, queued: bool = False, repo_url_or_dir: str = ".",
                 setup: str = TPU_SETUP, runtime_version: str | None = None) -> list[str]:
    """Shell command lines, run in order, that start `llm-jax ARGS` on every worker of a TPU VM slice.

    repo_url_or_dir: a git URL (cloned, or pulled if already there, on each worker) or a local checkout
    (copied as it is with gcloud scp). accelerator_type and runtime_version matter only with queued=True.
    """
    where = ["--zone", zone] + (["--project", project] if project else [])
    commands = []
    if queued:
        if not accelerator_type:
            raise LaunchError("--queued needs --accelerator-type (e.g. v4-32, v5litepod-16, v6e-8)")
        runtime = runtime_version or next(image for prefix, image in _TPU_RUNTIMES
                                          if accelerator_type.startswith(prefix))
        commands += [shlex.join(["gcloud", "compute", "tpus", "queued-resources", "create", tpu_name,
                                 "--node-id", tpu_name, *where, "--accelerator-type", accelerator_type,
                                 "--runtime-version", runtime]),
                     _wait_until_active(tpu_name, where)]
    if _is_git_url(repo_url_or_dir):
        remote_dir = "~/" + shlex.quote(re.split(r"[/:]", repo_url_or_dir.rstrip("/"))[-1].removesuffix(".git"))
        fetch = (f"(test -d {remote_dir} && git -C {remote_dir} pull -q --ff-only || "
                 f"git clone -q {shlex.quote(repo_url_or_dir)} {remote_dir})")
    else:
        local_dir = os.path.abspath(repo_url_or_dir)
        remote_dir, fetch = "~/" + shlex.quote(os.path.basename(local_dir)), ""
        commands.append(shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", local_dir,
                                    f"{tpu_name}:", *where, "--worker=all"]))
    # set -e: each step runs only if those before it succeeded, whatever `||` the setup holds.
    # LLM_JAX_DISTRIBUTED=1: llm_jax.distributed joins the workers, which jax finds in the TPU metadata.
    steps = ("set -e", fetch, f"cd {remote_dir}", setup.strip(), 'pip install -q -e . "jax[tpu]"',
             "LLM_JAX_DISTRIBUTED=1 " + shlex.join(["llm-jax", *args]))
    remote = "; ".join(step for step in steps if step)
    commands.append(shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, *where, "--worker=all",
                                "--command", remote]))
    return commands


def run_local(args: list[str], env: dict[str, str] | None = None) -> int:
    """Runs `llm-jax ARGS` here, with `env` added to this environment; returns its exit status."""
    process = subprocess.Popen(local_command(args), env=_run_env(env or {}))
    try:
        return _supervise([process])[1]
    finally:
        _stop([process])


def run_multiprocess(args: list[str], num_processes: int, devices_per_process: int, port: int | None = None) -> int:
    """Runs the processes of multiprocess_commands; returns 0 (75: preempted), or the status of the first that
    fails, after ending the others (they could only wait for it)."""
    commands = multiprocess_commands(args, num_processes, devices_per_process, port or free_port())
    logs = [None] + [tempfile.TemporaryFile() for _ in commands[1:]]
    processes = []
    try:
        for (additions, argv), log in zip(commands, logs):
            output = {} if log is None else {"stdout": log, "stderr": subprocess.STDOUT}
            processes.append(subprocess.Popen(argv, env=_run_env(additions), **output))
        failed, status = _supervise(processes)
        if failed:  # None: all succeeded; 0: process 0 has shown its own output
            print(f"llm-jax launch: process {failed} exited with status {status}; its last lines:\n"
                  f"{_tail(logs[failed])}", file=sys.stderr)
        return status
    finally:
        _stop(processes)
        for log in logs[1:]:
            log.close()


def free_port() -> int:
    """A TCP port that is free on this machine now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise LaunchError(f"--{name.replace('_', '-')}={value}: must be at least 1")


def _sbatch_line(key: str, value) -> str:
    # sbatch splits #SBATCH lines at whitespace, so a value cannot contain any.
    if not str(value) or any(c.isspace() for c in str(value)):
        raise LaunchError(f"--{key}={str(value)!r}: SLURM needs a non-empty value without spaces")
    return f"#SBATCH --{key}={value}"


def _wait_until_active(tpu_name: str, where: list[str]) -> str:
    describe = shlex.join(["gcloud", "compute", "tpus", "queued-resources", "describe", tpu_name, *where,
                           "--format", "value(state.state)"])
    return (f"while :; do state=$({describe}); case $state in ACTIVE) break;; FAILED|SUSPEND*) "
            f"echo \"queued resource {tpu_name} is $state\" >&2; exit 1;; esac; sleep 60; done")


def _is_git_url(repo: str) -> bool:
    return "://" in repo or re.match(r"[\w.-]+@[\w.-]+:", repo) is not None


def _effective_env(additions: dict[str, str]) -> dict[str, str]:
    """The additions as a process gets them: XLA_FLAGS joined to this environment's own XLA_FLAGS."""
    env = dict(additions)
    if "XLA_FLAGS" in env:
        kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
        env["XLA_FLAGS"] = " ".join(kept + [env["XLA_FLAGS"]])
    return env


def _run_env(additions: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **_effective_env(additions)}


def _supervise(processes: list[subprocess.Popen]) -> tuple[int | None, int]:
    """Waits for all; returns (index, status) of the first that fails, else (None, 0 or 75 if preempted).

    A preempted process is no failure: the others are saving the same checkpoint, so they are left to finish.
    """
    while True:
        try:
            statuses = [process.poll() for process in processes]
            failed = next((i for i, s in enumerate(statuses) if s not in (None, 0, _PREEMPTED_EXIT)), None)
            if failed is not None:
                return failed, statuses[failed]
            if None not in statuses:
                return None, max(statuses)
            time.sleep(0.1)
        except KeyboardInterrupt:
            # Ctrl-C reached the processes too (one process group): they save a checkpoint and exit 75.
            continue


def _stop(processes: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM to the processes still running (llm-jax saves at the next step it can), SIGKILL after grace_s."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(log, lines: int = 20) -> str:
    log.seek(0)
    return "\n".join(log.read().decode(errors="replace").splitlines()[-lines:])


def _job_name(args: list[str]) -> str:
    """The experiment's name from `--config X` (a file or a name), else llm-jax."""
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return Path(args[i + 1]).stem
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1]).stem
    return "llm-jax"


def _print_processes(commands: list[tuple[dict[str, str], list[str]]]) -> int:
    for additions, argv in commands:
        print(shlex.join([f"{key}={value}" for key, value in _effective_env(additions).items()] + argv))
    return 0


def _launch_local(opts, args: list[str]) -> int:
    return _print_processes([({}, local_command(args))]) if opts.dry_run else run_local(args)


def _launch_multiprocess(opts, args: list[str]) -> int:
    port = opts.port or free_port()
    commands = multiprocess_commands(args, opts.num_processes, opts.devices_per_process, port)
    if opts.dry_run:
        return _print_processes(commands)
    return run_multiprocess(args, opts.num_processes, opts.devices_per_process, port)


def _launch_slurm(opts, args: list[str]) -> int:
    script = slurm_script(args, job_name=opts.job_name or _job_name(args), nodes=opts.nodes,
                          gpus_per_node=opts.gpus_per_node, tasks=opts.tasks, time=opts.time,
                          partition=opts.partition, account=opts.account, log_dir=opts.log_dir,
                          setup=opts.setup, cpus_per_task=opts.cpus_per_task)
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


def _launch_tpu(opts, args: list[str]) -> int:
    if not _is_git_url(opts.repo) and not (Path(opts.repo) / "setup.py").is_file():
        raise LaunchError(f"--repo {opts.repo}: no setup.py there; give the llm_jax checkout or a git URL")
    commands = tpu_commands(args, tpu_name=opts.tpu_name, zone=opts.zone, project=opts.project,
                            accelerator_type=opts.accelerator_type, queued=opts.queued, repo_url_or_dir=opts.repo,
                            setup=opts.setup, runtime_version=opts.runtime_version)
    if opts.dry_run:
        print("\n".join(commands))
        return 0
    if not shutil.which("gcloud"):
        raise LaunchError("gcloud is not on PATH: install the Google Cloud CLI, or print the commands with --dry-run")
    for command in commands:
        status = subprocess.run(command, shell=True).returncode
        if status:
            return status
    return 0


class _Parser(argparse.ArgumentParser):
    """Reports bad options as a LaunchError, so that main prints them in one line."""

    def error(self, message: str):
        raise LaunchError(message)


def parser() -> argparse.ArgumentParser:
    after = "After the options: -- LLM_JAX_ARGS..., an llm-jax command line such as `train --config pretrain_tiny`."
    p = _Parser(prog="python -m llm_jax.launch", epilog=after, description="Start an llm-jax command line here, "
                "on several local processes, on a SLURM cluster or on a Cloud TPU VM slice.")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")

    def kind(name: str, summary: str) -> argparse.ArgumentParser:
        return kinds.add_parser(name, help=summary, description=summary, epilog=after)

    local = kind("local", "one process with all of this machine's devices")
    local.set_defaults(launch=_launch_local)
    multi = kind("local-multiprocess", "several CPU processes on this machine, one jax job")
    multi.add_argument("--num-processes", type=int, default=2)
    multi.add_argument("--devices-per-process", type=int, default=1, help="fake CPU devices of each process")
    multi.add_argument("--port", type=int, help="the coordinator's port (default: a free one)")
    multi.set_defaults(launch=_launch_multiprocess)
    slurm = kind("slurm", "an sbatch script for GPU nodes, submitted with sbatch")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int, default=8)
    slurm.add_argument("--tasks", choices=("node", "gpu"), default="node",
                       help="one process per node (driving all its GPUs) or one per GPU")
    slurm.add_argument("--cpus-per-task", type=int, help="CPU cores of each process (default: the cluster's)")
    slurm.add_argument("--time", default="24:00:00", help="time limit, e.g. 24:00:00")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--job-name", help="default: the --config name in the llm-jax arguments, else llm-jax")
    slurm.add_argument("--setup", default="", help="shell lines before srun, e.g. 'source .venv/bin/activate'")
    slurm.add_argument("--log-dir", default="slurm_logs", help="where each job's output goes (JOBNAME-JOBID.out)")
    slurm.add_argument("--out", help="also write the script to this file (and submit that file)")
    slurm.set_defaults(launch=_launch_slurm)
    tpu = kind("tpu", "the same command on every worker of a Cloud TPU VM slice")
    tpu.add_argument("--tpu-name", required=True)
    tpu.add_argument("--zone", required=True)
    tpu.add_argument("--project", help="default: gcloud's configured project")
    tpu.add_argument("--queued", action="store_true", help="first request the slice as a queued resource")
    tpu.add_argument("--accelerator-type", help="with --queued: e.g. v4-32, v5litepod-16, v6e-8")
    tpu.add_argument("--runtime-version", help="with --queued: the TPU VM image (default: Google's for JAX)")
    tpu.add_argument("--repo", default=".", help="a git URL to clone, or the checkout to copy (default: .)")
    tpu.add_argument("--setup", default=TPU_SETUP,
                     help="shell commands run on each worker before installing (default: a Python 3.11 venv)")
    tpu.set_defaults(launch=_launch_tpu)
    for launcher in (local, multi, slurm, tpu):
        launcher.add_argument("--dry-run", action="store_true", help="print what would run, and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    launcher_argv, args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    try:
        opts, unknown = parser().parse_known_args(launcher_argv)
        if unknown:
            raise LaunchError(f"unrecognized arguments: {shlex.join(unknown)} (the llm-jax command line goes "
                              "after `--`)")
        if not args:
            raise LaunchError("no llm-jax command line: put it after `--`, e.g. `-- train --config pretrain_tiny`")
        return opts.launch(opts, args)
    except LaunchError as e:
        print(f"llm-jax launch: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
