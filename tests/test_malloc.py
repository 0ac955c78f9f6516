"""llm_jax/malloc.py: with its settings XLA:CPU's per-step scratch memory is reused, not mapped afresh each step.

Each case is a fresh process (the settings must precede XLA's threads) on one CPU device, timing a train step
whose scratch memory (~190 MB, mostly logits) is larger than glibc's 64 MB per-thread heap.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

from llm_jax import malloc

REPO = Path(__file__).resolve().parents[1]
STEP = ["bench", "train", "--config", "pretrain_tiny", "--set", "model.d_model=32", "--set", "model.n_layers=1",
        "--set", "model.d_ff=64", "--set", "model.n_heads=2", "--set", "model.n_kv_heads=1",
        "--set", "train.batch_size=64", "--steps", "3", "--warmup", "2"]


def bench_in_fresh_process(**env):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", **env}
    out = subprocess.run([sys.executable, "-m", "llm_jax", *STEP], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    faults = float(re.search(r"^host page faults / step\s+([\d,]+)", out.stdout, re.M).group(1).replace(",", ""))
    return re.search(r"^host malloc\s+(\w+)", out.stdout, re.M).group(1), faults, out.stderr


def test_scratch_memory_is_reused_across_steps_unless_turned_off():
    mode, faults, _ = bench_in_fresh_process()
    assert mode == "reuse"
    system_mode, system_faults, _ = bench_in_fresh_process(LLM_JAX_MALLOC="system")
    assert system_mode == "system"
    # glibc's default maps the ~190 MB (~48k pages) anew every step; reused, at most a few pages are new.
    assert system_faults > 20_000, system_faults
    assert faults < system_faults / 10, (faults, system_faults)


def test_accelerators_and_bad_values_leave_malloc_alone(monkeypatch, capsys):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not malloc.runs_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert malloc.runs_on_cpu()
    monkeypatch.setenv("LLM_JAX_MALLOC", "jemalloc")
    malloc.reuse_freed_memory()
    assert "ignoring LLM_JAX_MALLOC='jemalloc'" in capsys.readouterr().err
