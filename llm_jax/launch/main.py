"""Launchers: the same `llm-jax` command line on this machine, on several local processes, on a SLURM GPU
cluster or on a Cloud TPU VM slice.

    python -m llm_jax.launch KIND [options] [--dry-run] -- LLM_JAX_ARGS...
    launch/KIND [options] [--dry-run] -- train --config pretrain_tiny --run-dir runs/x --set model.n_layers=2

  local, local-multiprocess  this machine: one process, or several CPU processes joined by jax.distributed
                             (local.py)
  slurm                      an sbatch script, submitted with sbatch (slurm.py)
  tpu                        gcloud commands that start the command on every worker of a TPU VM slice (tpu.py)

--dry-run prints what would run (per process the environment additions and the argv; the sbatch script; the
gcloud command lines) and exits. Bad input is one line on stderr and exit status 2; otherwise the status is
the launched command's (75: preempted after saving a checkpoint; the same command resumes).

For sweeps: local_command, multiprocess_commands (local.py), slurm_script (slurm.py) and tpu_commands
(tpu.py) are pure builders; run_local and run_multiprocess (local.py) start the processes and return an
exit status. add_sweep_options gives `llm-jax sweep` the options of these launchers, declared here once.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from llm_jax.errors import USAGE_EXIT, LaunchError
from llm_jax.launch.local import launch_local, launch_multiprocess
from llm_jax.launch.slurm import launch_slurm
from llm_jax.launch.tpu import TPU_SETUP, launch_tpu

_AFTER = "After the options: -- LLM_JAX_ARGS..., an llm-jax command line such as `train --config pretrain_tiny`."


class _Parser(argparse.ArgumentParser):
    """Reports bad options as a LaunchError, so that main prints them in one line."""

    def error(self, message: str):
        raise LaunchError(message)


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m llm_jax.launch", epilog=_AFTER, description="Start an llm-jax command line here, "
                "on several local processes, on a SLURM cluster or on a Cloud TPU VM slice.")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    for name, summary, add_arguments in (
            ("local", "one process with all of this machine's devices", _local_args),
            ("local-multiprocess", "several CPU processes on this machine, one jax job", _multiprocess_args),
            ("slurm", "an sbatch script for GPU nodes, submitted with sbatch", _slurm_args),
            ("tpu", "the same command on every worker of a Cloud TPU VM slice", _tpu_args)):
        launcher = kinds.add_parser(name, help=summary, description=summary, epilog=_AFTER)
        add_arguments(launcher)
        launcher.add_argument("--dry-run", action="store_true", help="print what would run, and exit")
    return p


def _local_args(p: argparse.ArgumentParser) -> None:
    p.set_defaults(launch=launch_local)


def _multiprocess_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=1, help="fake CPU devices of each process")
    p.add_argument("--port", type=int, help="the coordinator's port (default: a free one)")
    p.set_defaults(launch=launch_multiprocess)


def _slurm_args(p: argparse.ArgumentParser) -> None:
    _slurm_job_args(p)
    p.add_argument("--job-name", help="default: the --config name in the llm-jax arguments, else llm-jax")
    p.add_argument("--out", help="also write the script to this file (and submit that file)")
    p.set_defaults(launch=launch_slurm)


def _slurm_job_args(p: argparse.ArgumentParser) -> None:
    """The options of a job, which a sweep gives all of its points' jobs (it names each job and script)."""
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--tasks", choices=("node", "gpu"), default="node",
                   help="one process per node (driving all its GPUs) or one per GPU")
    p.add_argument("--cpus-per-task", type=int, help="CPU cores of each process (default: the cluster's)")
    p.add_argument("--time", default="24:00:00", help="time limit, e.g. 24:00:00")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--setup", default="", help="shell lines before srun, e.g. 'source .venv/bin/activate'")
    p.add_argument("--log-dir", default="slurm_logs", help="where each job's output goes (JOBNAME-JOBID.out)")
    p.add_argument("--requeue", action="store_true", help="when the run is preempted (exit 75, checkpoint "
                   "saved), requeue the job: it resumes from the checkpoint")


def _tpu_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tpu-name", required=True)
    p.add_argument("--zone", required=True)
    p.add_argument("--project", help="default: gcloud's configured project")
    p.add_argument("--queued", action="store_true", help="first request the slice as a queued resource")
    p.add_argument("--accelerator-type", help="with --queued: e.g. v4-32, v5litepod-16, v6e-8")
    p.add_argument("--runtime-version", help="with --queued: the TPU VM image (default: Google's for JAX)")
    p.add_argument("--repo", dest="repo_url_or_dir", metavar="URL_OR_DIR", default=".",
                   help="a git URL to clone, or the checkout to copy (default: .)")
    p.add_argument("--setup", default=TPU_SETUP,
                   help="shell commands run on each worker before installing (default: a Python 3.11 venv)")
    p.set_defaults(launch=launch_tpu)


def add_sweep_options(parser: argparse.ArgumentParser) -> list[str]:
    """Adds the options of the launchers a sweep drives (its --launcher) to the sweep's parser, as a group;
    returns their names, which are those of the keyword arguments of the launchers' builders."""
    group = parser.add_argument_group("launcher options", "as for launch/<kind> (see llm_jax/launch/)")
    added = {}
    for kind, add_arguments in (("local-multiprocess", _multiprocess_args), ("slurm", _slurm_job_args),
                                ("tpu", _tpu_args)):
        add_arguments(_SweepOptions(group, kind, added))
    return list(added)


class _SweepOptions:
    """Stands in for a launcher's parser, to declare its options in a sweep's group as well. An option is
    left out unless given, so that the launcher's own default applies and a required one (tpu's --zone) is
    checked only with that launcher; one of two launchers (--setup) is added once, its help naming both."""

    def __init__(self, group: argparse._ArgumentGroup, kind: str, added: dict[str, argparse.Action]):
        self.group, self.kind, self.added = group, kind, added

    def add_argument(self, *flags: str, **kwargs) -> None:
        dest = kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
        about = f"{self.kind}: {kwargs['help']}" if kwargs.get("help") else self.kind
        if dest in self.added:
            self.added[dest].help += f"; {about}"
        else:
            kwargs.update(default=argparse.SUPPRESS, required=False, help=about)
            self.added[dest] = self.group.add_argument(*flags, **kwargs)

    def set_defaults(self, **defaults) -> None:
        pass  # the launcher's entry point: a sweep calls the launchers' builders itself


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
        return USAGE_EXIT
