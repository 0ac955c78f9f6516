"""`llm-jax bench data | generate | checkpoint`: what surrounds the train step.

  bench data        the task's batch source alone: global tokens/s it delivers (host batches, no device)
  bench generate    decode tokens/s with the KV cache at batch 1 and 16 (greedy, random weights)
  bench checkpoint  how long a save holds up training (asynchronous: the device-to-host copy) and the whole write
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import grain
import jax
import numpy as np
from flax import linen as nn

from llm_jax import tasks
from llm_jax.bench.train import bench_setup, real_source
from llm_jax.config import Config
from llm_jax.inference.generate import Generator, Sampling
from llm_jax.inference.runner import ModelRunner
from llm_jax.model import Transformer
from llm_jax.train import checkpoint


def bench_data(cfg: Config, batches: int = 50) -> dict:
    """Global tokens/s the task's source delivers to the host, after its first batch (preparation not
    timed)."""
    task = tasks.make(cfg, check=False)
    with real_source(task) as source:
        source.next_batch(None)
        t0 = time.perf_counter()
        for _ in range(batches):
            source.next_batch(None)
        elapsed = time.perf_counter() - t0
    return {"batches": batches, "tokens_per_sec": batches * task.tokens_per_step / elapsed,
            "batch_ms": elapsed / batches * 1e3}


def bench_generate(cfg: Config, prompt_len: int = 32, new_tokens: int = 128) -> dict[int, float]:
    """Decode tokens/s with the KV cache (greedy, random weights) at batch 1 and 16."""
    dummy = np.zeros((1, 8), np.int32)
    params = nn.unbox(Transformer(cfg.model).init(jax.random.key(0), dummy, dummy, dummy + 1))["params"]
    generator = Generator(ModelRunner(cfg.model, params), Sampling(temperature=0))
    rates = {}
    for batch in (1, 16):
        prompts = np.random.default_rng(0).integers(8, cfg.model.vocab_size, (batch, prompt_len)).tolist()
        generator.generate(prompts, new_tokens)  # compile
        t0 = time.perf_counter()
        generator.generate(prompts, new_tokens)
        rates[batch] = batch * new_tokens / (time.perf_counter() - t0)
    return rates


def bench_checkpoint(cfg: Config, saves: int = 3) -> dict:
    """Median seconds a save holds up the step (async: the device-to-host copy) and a whole save takes."""
    state = bench_setup(cfg).state
    iterator = iter(grain.MapDataset.range(1).to_iter_dataset())  # a data position to save, as training does
    held, whole = [], []
    with tempfile.TemporaryDirectory(prefix="llm_jax_bench_ckpt_") as tmp:
        mngr = checkpoint.manager(Path(tmp), cfg.checkpoint)
        try:
            for _ in range(saves):
                state = state.replace(step=state.step + 1)
                t0 = time.perf_counter()
                checkpoint.save(mngr, state, iterator, {"bench": True})
                held.append(time.perf_counter() - t0)
                mngr.wait_until_finished()
                whole.append(time.perf_counter() - t0)
        finally:
            mngr.close()
    return {"held_s": statistics.median(held), "whole_s": statistics.median(whole),
            "bytes": checkpoint.estimated_bytes(state), "async": cfg.checkpoint.async_save}


def run_data(cfg: Config, steps: int = 50) -> str:
    """What `llm-jax bench data` prints (`steps`: batches timed)."""
    r = bench_data(cfg, steps)
    return (f"bench data {cfg.name}: {r['tokens_per_sec']:,.0f} tokens/s ({r['batch_ms']:.2f} ms per global batch "
            f"of {cfg.train.batch_size}×{cfg.data.seq_len}, {r['batches']} batches)")


def run_generate(cfg: Config) -> str:
    """What `llm-jax bench generate` prints."""
    return "\n".join(f"bench generate {cfg.name}: batch {batch:>2}: {rate:,.0f} tokens/s (KV cache, greedy)"
                     for batch, rate in bench_generate(cfg).items())


def run_checkpoint(cfg: Config) -> str:
    """What `llm-jax bench checkpoint` prints."""
    r = bench_checkpoint(cfg)
    return (f"bench checkpoint {cfg.name}: {r['bytes'] / 2**20:.1f} MiB state; a save holds the step up "
            f"{r['held_s'] * 1e3:.0f} ms ({'async' if r['async'] else 'sync'}), the whole write takes "
            f"{r['whole_s'] * 1e3:.0f} ms")
