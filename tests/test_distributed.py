"""The multi-host path for real: 2 processes x 2 CPU devices (gloo collectives), started as
launch/local-multiprocess starts them, against 1 process x 4 devices.

Other meshes of the 4 devices (data x fsdp x tensor):
    LLM_JAX_TEST_MP_MESHES="2x2x1,1x2x2,2x1x2" pytest tests/test_distributed.py
"""
import os
import subprocess

import numpy as np
import pytest
from test_train import make_corpus, scalars

from llm_jax.launch import free_port, local_command, multiprocess_commands

STEPS = 6
MESHES = os.environ.get("LLM_JAX_TEST_MP_MESHES", "1x4x1").split(",")


def train_args(corpus, run_dir, mesh):
    data, fsdp, tensor = mesh.split("x")
    return ["train", "--config", "pretrain_tiny", "--run-dir", str(run_dir), "--set", f"data.sources=text:{corpus}/*.txt",
            "--set", f"mesh.data={data}", "--set", f"mesh.fsdp={fsdp}", "--set", f"mesh.tensor={tensor}",
            "--set", "model.vocab_size=320", "--set", "model.d_model=32", "--set", "model.n_layers=2",
            "--set", "model.d_ff=64", "--set", "data.seq_len=32", "--set", "train.batch_size=8",
            "--set", f"train.steps={STEPS}", "--set", "train.eval_every=3", "--set", "train.log_every=1",
            "--set", "data.max_bytes=0", "--set", "train.eval_batches=0", "--set", "checkpoint.every=3"]


def start(argv, env_additions):
    return subprocess.Popen(argv, env={**os.environ, **env_additions}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(procs):
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


@pytest.mark.parametrize("mesh", MESHES)
def test_two_processes_train_like_one_process_with_the_same_devices(tmp_path, mesh):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    make_corpus(corpus)
    one, two = tmp_path / "one", tmp_path / "two"
    single_env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [start(local_command(train_args(corpus, one, mesh)), single_env)]
    procs += [start(argv, env) for env, argv in multiprocess_commands(train_args(corpus, two, mesh), 2, 2,
                                                                      free_port())]
    _, lead, follower = finish(procs)
    assert "4 × cpu (2 process)" in lead and "held-out split" in lead
    assert "held-out split" not in follower and "run directory" not in follower  # process 0 alone reports

    reference, _ = scalars(one)
    distributed, _ = scalars(two)
    for key in ("train/loss_bits_per_token", "train/bits_per_byte", "optim/grad_norm", "eval/bits_per_byte"):
        ref = [v for _, v in reference[key]]
        assert len(ref) == (STEPS if key.startswith(("train", "optim")) else 2)
        np.testing.assert_allclose([v for _, v in distributed[key]], ref, rtol=2e-5, err_msg=key)
    assert len(list((two / "tb").iterdir())) == 1  # one set of event files, from process 0
    assert sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
