"""Launchers: the exact sbatch scripts and gcloud lines of --dry-run, per-process flags, one-line errors."""
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from llm_jax.errors import PREEMPTED_EXIT
from llm_jax.launch.local import _stop, _supervise, multiprocess_commands, run_local
from llm_jax.launch.main import main
from llm_jax.launch.slurm import slurm_script
from llm_jax.launch.tpu import tpu_commands

REPO = Path(__file__).resolve().parents[1]

SLURM_NODE = """\
#!/bin/bash
#SBATCH --job-name=pretrain_tiny
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --time=24:00:00
#SBATCH --output=slurm_logs/%x-%j.out
# SIGTERM 5 minutes before the time limit: llm-jax saves a checkpoint and exits 75;
# submitting the same script again resumes.
#SBATCH --signal=TERM@300
set -euo pipefail
# One process per node drives all GPUs of its node. JAX's SLURM detection assumes one process
# per GPU and would give each process only GPU number SLURM_LOCALID: list them all instead.
export JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7
# jax.distributed.initialize() finds the job from what srun sets (SLURM_STEP_NODELIST, SLURM_NTASKS,
# SLURM_PROCID). No --kill-on-bad-exit: after SIGTERM each process exits 75 once the checkpoint is
# saved, and ending the others at the first exit could cut their save short; a process that
# crashes is noticed by the others through jax.distributed's heartbeats.
srun llm-jax train --config pretrain_tiny --run-dir runs/x
"""

SLURM_GPU = """\
#!/bin/bash
#SBATCH --job-name=llama
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=02:00:00
#SBATCH --partition=gpu
#SBATCH --account=proj1
#SBATCH --output=logs/%x-%j.out
# SIGTERM 5 minutes before the time limit: llm-jax saves a checkpoint and exits 75;
# submitting the same script again resumes.
#SBATCH --signal=TERM@300
set -euo pipefail
source .venv/bin/activate
# One process per GPU: JAX's SLURM detection gives each process the GPU numbered SLURM_LOCALID
# among those it sees, so every process must see all GPUs of its node (no per-task binding).
# jax.distributed.initialize() finds the job from what srun sets (SLURM_STEP_NODELIST, SLURM_NTASKS,
# SLURM_PROCID). No --kill-on-bad-exit: after SIGTERM each process exits 75 once the checkpoint is
# saved, and ending the others at the first exit could cut their save short; a process that
# crashes is noticed by the others through jax.distributed's heartbeats.
srun --cpus-per-task=8 --gpu-bind=none llm-jax train --config experiments/llama_1b.py \
--set 'optim.schedule=cosine decay'
"""

TPU_SETUP = ("test -x ~/llm_jax_venv/bin/pip || { sudo apt-get -qq update && sudo apt-get -qq install -y "
             "python3.11-venv && python3.11 -m venv ~/llm_jax_venv; } && . ~/llm_jax_venv/bin/activate")

TPU = f"""\
gcloud compute tpus tpu-vm scp --recurse {REPO} my-tpu: --zone us-central2-b --worker=all
gcloud compute tpus tpu-vm ssh my-tpu --zone us-central2-b --worker=all --command 'set -e; cd ~/{REPO.name}; \
{TPU_SETUP}; pip install -q -e . "jax[tpu]"; LLM_JAX_DISTRIBUTED=1 llm-jax train --config llama_1b --run-dir runs/l'
"""

TPU_QUEUED = """\
gcloud compute tpus queued-resources create my-tpu --node-id my-tpu --zone us-east5-b --project p1 \
--accelerator-type v6e-16 --runtime-version v2-alpha-tpuv6e
while :; do state=$(gcloud compute tpus queued-resources describe my-tpu --zone us-east5-b --project p1 \
--format 'value(state.state)'); case $state in ACTIVE) break;; FAILED|SUSPEND*) echo "queued resource my-tpu is \
$state" >&2; exit 1;; esac; sleep 60; done
gcloud compute tpus tpu-vm ssh my-tpu --zone us-east5-b --project p1 --worker=all --command 'set -e; \
(test -d ~/llm_jax && git -C ~/llm_jax pull -q --ff-only || git clone -q https://github.com/me/llm_jax.git ~/llm_jax); \
cd ~/llm_jax; source venv/bin/activate; pip install -q -e . "jax[tpu]"; LLM_JAX_DISTRIBUTED=1 llm-jax train \
--config llama_1b --set '"'"'data.sources=["a b"]'"'"''
"""


def dry_run(capsys, *argv):
    assert main([*argv]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def test_slurm_one_process_per_node(capsys):
    out = dry_run(capsys, "slurm", "--nodes", "2", "--dry-run", "--", "train", "--config", "pretrain_tiny",
                  "--run-dir", "runs/x")
    assert out == SLURM_NODE


def test_slurm_one_process_per_gpu(capsys, tmp_path):
    out = dry_run(capsys, "slurm", "--nodes", "4", "--gpus-per-node", "4", "--tasks", "gpu", "--cpus-per-task", "8",
                  "--time", "02:00:00", "--partition", "gpu", "--account", "proj1", "--log-dir", "logs",
                  "--job-name", "llama", "--setup", "source .venv/bin/activate", "--out", str(tmp_path / "job.sbatch"),
                  "--dry-run", "--", "train", "--config", "experiments/llama_1b.py",
                  "--set", "optim.schedule=cosine decay")
    assert out == SLURM_GPU
    assert (tmp_path / "job.sbatch").read_text() == SLURM_GPU


def test_slurm_job_name_comes_from_the_config():
    script = slurm_script(["train", "--config=experiments/gpt2_124m.py"], job_name="gpt2_124m", nodes=1,
                          gpus_per_node=1)
    assert "#SBATCH --job-name=gpt2_124m\n" in script
    assert "#SBATCH --partition" not in script and "#SBATCH --account" not in script


def test_tpu_existing_slice(capsys):
    out = dry_run(capsys, "tpu", "--tpu-name", "my-tpu", "--zone", "us-central2-b", "--repo", str(REPO), "--dry-run",
                  "--", "train", "--config", "llama_1b", "--run-dir", "runs/l")
    assert out == TPU


def test_tpu_queued_slice_from_a_git_url(capsys):
    out = dry_run(capsys, "tpu", "--tpu-name", "my-tpu", "--zone", "us-east5-b", "--project", "p1", "--queued",
                  "--accelerator-type", "v6e-16", "--repo", "https://github.com/me/llm_jax.git",
                  "--setup", "source venv/bin/activate", "--dry-run",
                  "--", "train", "--config", "llama_1b", "--set", 'data.sources=["a b"]')
    assert out == TPU_QUEUED
    # The remote command survives both rounds of shell quoting intact.
    remote = shlex.split(out.splitlines()[-1])[-1]
    assert shlex.split(remote.split("LLM_JAX_DISTRIBUTED=1 ")[1])[-1] == 'data.sources=["a b"]'


def test_tpu_runtime_version_follows_the_generation():
    for accelerator, runtime in (("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
                                 ("v5p-8", "v2-alpha-tpuv5")):
        create = tpu_commands(["train"], tpu_name="t", zone="z", accelerator_type=accelerator, queued=True,
                              repo_url_or_dir="git@github.com:me/llm_jax.git")[0]
        assert create.endswith(f"--runtime-version {runtime}")


def test_multiprocess_flags_and_env():
    commands = multiprocess_commands(["train", "--config", "pretrain_tiny"], 3, 2, port=12345)
    assert len(commands) == 3
    for i, (env, argv) in enumerate(commands):
        assert env == {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
        assert argv == [sys.executable, "-m", "llm_jax", "train", "--config", "pretrain_tiny",
                        "--coordinator", "127.0.0.1:12345", "--num-processes", "3", "--process-id", str(i)]


def test_multiprocess_dry_run_keeps_the_callers_other_xla_flags(capsys, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/hlo --xla_force_host_platform_device_count=8")
    out = dry_run(capsys, "local-multiprocess", "--devices-per-process", "4", "--port", "2222", "--dry-run",
                  "--", "train", "--config", "pretrain_tiny")
    python = shlex.quote(sys.executable)
    assert out.splitlines() == [
        f"JAX_PLATFORMS=cpu 'XLA_FLAGS=--xla_dump_to=/tmp/hlo --xla_force_host_platform_device_count=4' {python} "
        f"-m llm_jax train --config pretrain_tiny --coordinator 127.0.0.1:2222 --num-processes 2 --process-id {i}"
        for i in range(2)]


def test_local_dry_run(capsys):
    out = dry_run(capsys, "local", "--dry-run", "--", "train", "--config", "pretrain_tiny")
    assert out == f"{shlex.quote(sys.executable)} -m llm_jax train --config pretrain_tiny\n"


@pytest.mark.parametrize("argv, message", [
    (["local"], "no llm-jax command line"),
    (["local", "--"], "no llm-jax command line"),
    (["local", "train", "--config", "x"], "unrecognized arguments: train --config x"),
    (["cloud", "--", "train"], "invalid choice: 'cloud'"),
    (["slurm", "--nodes", "0", "--", "train"], "--nodes=0: must be at least 1"),
    (["slurm", "--job-name", "my run", "--dry-run", "--", "train"], "without spaces"),
    (["local-multiprocess", "--num-processes", "0", "--", "train"], "--num-processes=0"),
    (["local-multiprocess", "--", "prepare", "--config", "x"], "runs `train ...`"),
    (["tpu", "--zone", "z", "--", "train"], "required: --tpu-name"),
    (["tpu", "--tpu-name", "t", "--zone", "z", "--queued", "--", "train"], "--queued needs --accelerator-type"),
    (["tpu", "--tpu-name", "t", "--zone", "z", "--repo", "/nonexistent", "--", "train"], "no setup.py there"),
])
def test_bad_input_is_one_line_and_status_2(capsys, argv, message):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("llm-jax launch: error: ")
    assert message in err


def test_slurm_without_sbatch_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert main(["slurm", "--out", str(tmp_path / "job.sbatch"), "--", "train", "--config", "x"]) == 2
    assert capsys.readouterr().err == ("llm-jax launch: error: sbatch is not on PATH: submit from a SLURM login node, "
                                       "or write the script with --dry-run / --out FILE\n")
    assert not (tmp_path / "job.sbatch").exists()


def test_launch_scripts_wrap_the_module():
    for kind in ("local", "local-multiprocess", "slurm", "tpu"):
        script = REPO / "launch" / kind
        assert script.stat().st_mode & 0o111
        assert script.read_text().splitlines()[-1] == f'exec "${{PYTHON:-python}}" -m llm_jax.launch {kind} "$@"'


def test_run_local_returns_the_exit_status(capsys):
    assert run_local(["--help"]) == 0


def test_a_failure_ends_the_other_processes_but_a_preemption_does_not():
    def exits(status, after_s):
        return subprocess.Popen([sys.executable, "-c", f"import sys, time; time.sleep({after_s}); sys.exit({status})"])

    preempted = [exits(PREEMPTED_EXIT, 0), exits(0, 0.5)]
    assert _supervise(preempted) == (None, PREEMPTED_EXIT)
    assert preempted[1].returncode == 0  # left to finish its part of the checkpoint
    failed = [exits(0, 30), exits(3, 0)]
    try:
        assert _supervise(failed) == (1, 3)
    finally:
        _stop(failed)
    assert failed[0].returncode < 0  # ended by SIGTERM, not left to wait 30 s


def test_slurm_requeue_script_requeues_on_preemption_only(capsys):
    out = dry_run(capsys, "slurm", "--nodes", "2", "--requeue", "--dry-run", "--", "train", "--config",
                  "pretrain_tiny", "--run-dir", "runs/x")
    header = out[out.index("# --requeue"):out.index("set -euo pipefail")]
    assert header.endswith("#SBATCH --requeue\n#SBATCH --open-mode=append\n")
    assert all(line.startswith("#") for line in header.splitlines())  # sbatch reads options up to the first command
    head, tail = out.split(f"# Exit status {PREEMPTED_EXIT}:")
    assert tail.endswith("status=0\nsrun llm-jax train --config pretrain_tiny --run-dir runs/x || status=$?\n"
                         f'if [ "$status" -eq {PREEMPTED_EXIT} ]; then\n  scontrol requeue "$SLURM_JOB_ID"\n'
                         '  exit 0\nfi\nexit "$status"\n')
    # The rest is the script without --requeue, which ends in srun: its status is the job's.
    assert head.replace(header, "") + "srun llm-jax train --config pretrain_tiny --run-dir runs/x\n" == SLURM_NODE


@pytest.mark.parametrize("srun_status, script_status, requeued", [(PREEMPTED_EXIT, 0, True), (0, 0, False),
                                                                  (3, 3, False)])
def test_slurm_requeue_script_runs_so(tmp_path, srun_status, script_status, requeued):
    """The generated script under bash, srun and scontrol stubbed by executables on PATH that log their calls."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for name, status in (("srun", srun_status), ("scontrol", 0)):
        stub = bin_dir / name
        stub.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit {status}\n')
        stub.chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(slurm_script(["train", "--config", "pretrain_tiny"], job_name="j", nodes=1, gpus_per_node=2,
                                   requeue=True))
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "4242"}
    assert subprocess.run(["bash", str(script)], env=env).returncode == script_status
    expected = ["srun llm-jax train --config pretrain_tiny"] + (["scontrol requeue 4242"] if requeued else [])
    assert calls.read_text().splitlines() == expected

