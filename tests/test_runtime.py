"""llm_jax/runtime.py: the process settings `import llm_jax` makes before JAX starts.

Cases that need those settings at start-up run in a fresh process on one CPU device.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llm_jax import runtime

REPO = Path(__file__).resolve().parents[1]
# A train step whose scratch memory (~190 MB, mostly logits) is larger than glibc's 64 MB per-thread heap.
STEP = ["bench", "train", "--config", "pretrain_tiny", "--set", "model.vocab_size=2048", "--set", "model.d_model=32",
        "--set", "model.n_layers=1", "--set", "model.d_ff=64", "--set", "model.n_heads=2", "--set", "model.n_kv_heads=1",
        "--set", "train.batch_size=64", "--steps", "10", "--warmup", "4"]


def fresh_process(args, **env):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **env}
    out = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def bench_faults(**env):
    out = fresh_process(["-m", "llm_jax", *STEP], XLA_FLAGS="--xla_backend_optimization_level=0", **env)
    faults = float(re.search(r"^host page faults / step \(median\)\s+([\d,]+)", out, re.M).group(1).replace(",", ""))
    return re.search(r"^host malloc\s+(\w+)", out, re.M).group(1), faults


@pytest.mark.slow
def test_scratch_memory_is_reused_across_steps_unless_turned_off():
    mode, faults = bench_faults(LLM_JAX_MALLOC="reuse")
    system_mode, system_faults = bench_faults(LLM_JAX_MALLOC="system")
    assert (mode, system_mode) == ("reuse", "system")
    # glibc's default maps the ~190 MB (~48k pages) anew every step. Reused, most steps (the median) touch no
    # new page; now and then the heap grows once more when small allocations have split the freed block.
    assert system_faults > 20_000, system_faults
    assert faults < system_faults / 3, (faults, system_faults)


def test_backend_is_read_without_starting_jax_and_bad_values_are_ignored(monkeypatch, capsys):
    for platforms, expected in [("cuda,cpu", "gpu"), ("rocm", "gpu"), ("tpu", "tpu"), ("cpu", "cpu")]:
        monkeypatch.setenv("JAX_PLATFORMS", platforms)
        assert runtime.backend() == expected
    # Not a CPU run, so the warning comes without changing this (the test suite's) process's malloc.
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    monkeypatch.setenv("LLM_JAX_MALLOC", "jemalloc")
    assert runtime.reuse_freed_memory() == "system"
    assert "ignoring LLM_JAX_MALLOC='jemalloc'" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_xla_flags_keep_the_users_values_and_parse_in_this_jaxlib():
    flags = runtime.with_gpu_flags("--xla_gpu_enable_latency_hiding_scheduler=false --xla_dump_to=/tmp/x")
    assert flags.split().count("--xla_gpu_enable_latency_hiding_scheduler=false") == 1
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" not in flags
    every = runtime.with_gpu_flags("")
    assert len(every.split()) == len(runtime.GPU_XLA_FLAGS)
    # XLA parses every backend's flags at start-up and aborts on one it does not know.
    out = fresh_process(["-c", "import jax; print(float(jax.numpy.ones(3).sum()))"], XLA_FLAGS=every)
    assert out.strip() == "3.0"
