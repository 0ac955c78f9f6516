"""The `tpu` launcher: gcloud commands that copy the code to every worker of a TPU VM slice (scp of a
checkout, or git clone of a URL), install it with jax[tpu], then start the same command on all workers at
once, as a pod needs (jax.distributed.initialize() reads the TPU metadata); with --queued, first request the
slice as a queued resource and wait until it is ACTIVE. The run lasts as long as the ssh session; run the
same launch again to resume from the last checkpoint.

tpu_commands is a pure builder, for sweeps too.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from llm_jax.errors import LaunchError

# Stock TPU VM images are Ubuntu 22.04 with Python 3.10; jax 0.10 and llm_jax need 3.11, so the default
# setup makes (once) and activates a Python 3.11 virtual environment on every worker.
TPU_SETUP = ("test -x ~/llm_jax_venv/bin/pip || { sudo apt-get -qq update && sudo apt-get -qq install -y "
             "python3.11-venv && python3.11 -m venv ~/llm_jax_venv; } && . ~/llm_jax_venv/bin/activate")
# Google's TPU VM images for JAX by TPU generation (cloud.google.com/tpu/docs/runtimes); v4 and older: the last.
_TPU_RUNTIMES = (("v6e", "v2-alpha-tpuv6e"), ("v5p", "v2-alpha-tpuv5"), ("v5litepod", "v2-alpha-tpuv5-lite"),
                 ("v5e", "v2-alpha-tpuv5-lite"), ("", "tpu-ubuntu2204-base"))


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
    # LLM_JAX_DISTRIBUTED=1: llm_jax.parallel.distributed joins the workers, which jax finds in the TPU metadata.
    steps = ("set -e", fetch, f"cd {remote_dir}", setup.strip(), 'pip install -q -e . "jax[tpu]"',
             "LLM_JAX_DISTRIBUTED=1 " + shlex.join(["llm-jax", *args]))
    remote = "; ".join(step for step in steps if step)
    commands.append(shlex.join(["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu_name, *where, "--worker=all",
                                "--command", remote]))
    return commands


def launch_tpu(opts, args: list[str]) -> int:
    """`launch tpu`: prints the gcloud commands (--dry-run) or runs them in order until one fails."""
    repo = opts.repo_url_or_dir
    if not _is_git_url(repo) and not (Path(repo) / "setup.py").is_file():
        raise LaunchError(f"--repo {repo}: no setup.py there; give the llm_jax checkout or a git URL")
    commands = tpu_commands(args, tpu_name=opts.tpu_name, zone=opts.zone, project=opts.project,
                            accelerator_type=opts.accelerator_type, queued=opts.queued, repo_url_or_dir=repo,
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


def _wait_until_active(tpu_name: str, where: list[str]) -> str:
    describe = shlex.join(["gcloud", "compute", "tpus", "queued-resources", "describe", tpu_name, *where,
                           "--format", "value(state.state)"])
    return (f"while :; do state=$({describe}); case $state in ACTIVE) break;; FAILED|SUSPEND*) "
            f"echo \"queued resource {tpu_name} is $state\" >&2; exit 1;; esac; sleep 60; done")


def _is_git_url(repo: str) -> bool:
    return "://" in repo or re.match(r"[\w.-]+@[\w.-]+:", repo) is not None
