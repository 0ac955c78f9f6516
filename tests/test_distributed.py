"""The multi-host path for real: 2 processes x 2 CPU devices (gloo collectives), started as
launch/local-multiprocess starts them, against 1 process x 4 devices.

Other meshes of the 4 devices (data x fsdp x tensor):
    LLM_JAX_TEST_MP_MESHES="2x2x1,1x2x2,2x1x2" pytest tests/test_distributed.py
"""
import os
import subprocess

import numpy as np
import pytest

from llm_jax.launch.local import free_port, local_command, multiprocess_commands

STEPS = 6
MESHES = os.environ.get("LLM_JAX_TEST_MP_MESHES", "1x4x1").split(",")


def mesh_overrides(mesh):
    data, fsdp, tensor = mesh.split("x")
    return (f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}", f"train.steps={STEPS}",
            "train.eval_every=3", "train.log_every=1", "checkpoint.every=3")


def start(argv, env_additions):
    return subprocess.Popen(argv, env={**os.environ, **env_additions}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(procs):
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("mesh", MESHES)
def test_two_processes_train_like_one_process_with_the_same_devices(tmp_path, mesh, train_args, scalars):
    one, two = tmp_path / "one", tmp_path / "two"
    single_env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    commands = [(single_env, local_command(train_args(one, *mesh_overrides(mesh)))),
                *multiprocess_commands(train_args(two, *mesh_overrides(mesh)), 2, 2, free_port())]
    # All three compile as the suite does (conftest.py), least optimised: the same programs, sooner.
    procs = [start(argv, {**env, "XLA_FLAGS": env["XLA_FLAGS"] + " --xla_backend_optimization_level=0"})
             for env, argv in commands]
    _, lead, follower = finish(procs)
    assert "4 × cpu (2 process)" in lead and "held-out split" in lead
    assert "held-out split" not in follower and "run directory" not in follower  # process 0 alone reports

    reference, _ = scalars(one)
    distributed, _ = scalars(two)
    for key in ("train/loss_bits_per_token", "train/bits_per_byte", "optim/grad_norm", "eval/bits_per_byte"):
        ref = [v for _, v in reference[key]]
        assert len(ref) == (STEPS if key.startswith(("train", "optim")) else 2)
        np.testing.assert_allclose([v for _, v in distributed[key]], ref, rtol=2e-5, err_msg=key)
    # One event file per TensorBoard run (the model's, and each compressor's reference line), from process 0.
    assert sorted(len([f for f in d.iterdir() if f.is_file()]) for d in [two / "tb", *(two / "tb").iterdir()]
                  if d.is_dir()) == [1] * 7
    assert sorted(p.name for p in (two / "checkpoints").iterdir() if p.name.isdigit()) == ["3", "6"]
