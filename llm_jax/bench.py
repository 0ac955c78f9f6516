"""`llm-jax bench`: how fast the train step, the data pipeline, decoding and checkpointing are.

  bench train       compiles once, runs warm-up steps, then times N steps of the real train step (same jit,
                    shardings, optimizer and loss as `train`) on synthetic tokens, so the data pipeline is not
                    measured (--real-data: batches from the experiment's pipeline, fetched inside the timed
                    loop); --compare-torch also times the PyTorch eager reference (benchmarks/torch_reference.py)
                    of the same model and prints the ratio as the last line; --profile DIR writes a jax.profiler
                    trace of the timed steps for TensorBoard's profile plugin
  bench data        the pipeline alone: global tokens/s it delivers (host batches, no device)
  bench generate    decode tokens/s with the KV cache at batch 1 and 16 (greedy, random weights)
  bench checkpoint  how long a save holds up training (asynchronous: the device-to-host copy) and the whole write
  bench memory      the largest global batch whose train step XLA plans to fit in a device's memory: the step is
                    compiled for abstract arrays (nothing allocated, nothing run) at the configured batch, doubled
                    or halved until the answer changes, then bisected

Model TFLOP/s and MFU use metrics.flops_per_token and the peak table (the formula of TensorBoard's perf/mfu);
MFU is NaN where the device's peak is unknown (CPU) unless train.peak_tflops gives one.
"""
from __future__ import annotations

import importlib.util
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from llm_jax import checkpoint, metrics, optim, runtime, sharding, step
from llm_jax.config import REPO_ROOT, Config, ConfigError
from llm_jax.losses import NEXT_TOKEN
from llm_jax.model import Transformer
from llm_jax.state import check_fits, create_state, logical_specs

TORCH_REFERENCE = REPO_ROOT / "benchmarks" / "torch_reference.py"


def synthetic_batch(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """One global batch of random tokens, (microbatches, batch / microbatches, seq_len) per key, one document
    per row (the train step's cost does not depend on the token values)."""
    M, B, T = cfg.train.microbatches, cfg.train.batch_size // cfg.train.microbatches, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    tokens = rng.integers(8, cfg.model.vocab_size, (M, B, T + 1), dtype=np.int32)
    ones = np.ones((M, B, T), np.int32)
    return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "segment_ids": ones,
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (M, B, T)).copy(),
            "weights": ones.astype(np.float32), "target_bytes": ones * 3}


def _setup(cfg: Config):
    mesh = sharding.make_mesh(cfg.mesh)
    model = Transformer(cfg.model)
    optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
    state, shardings = create_state(model, optimizer, mesh, cfg.data.seq_len, jax.random.key(cfg.train.seed))
    train_fn = step.jit_train_step(model, optimizer, optim.schedule(cfg.optim, cfg.train.steps), mesh, shardings,
                                   NEXT_TOKEN)
    return mesh, state, train_fn


def bench_train(cfg: Config, steps: int = 20, warmup: int = 3, real_data: bool = False,
                profile: str | None = None) -> dict:
    """Times the train step; returns the figures `format_train` prints."""
    if cfg.data.format != "text":
        raise ConfigError("bench train measures next-token pretraining (data.format=text)")
    mesh, state, train_fn = _setup(cfg)
    shardings = step.batch_shardings(mesh, NEXT_TOKEN, microbatched=True)
    if real_data:
        batches, prepared_dir = _real_batches(cfg)
        next_batch = lambda: sharding.global_batch(next(batches), shardings)
    else:
        fixed = sharding.global_batch(synthetic_batch(cfg), shardings)
        next_batch = lambda: fixed

    t0 = time.perf_counter()
    compiled = train_fn.lower(state, next_batch()).compile()
    compile_s = time.perf_counter() - t0
    plan = compiled.memory_analysis()

    def one_step(s):
        s, m = compiled(s, next_batch())
        jax.block_until_ready(m)
        return s

    for _ in range(1 + warmup):
        state = one_step(state)
    times = []
    if profile:
        jax.profiler.start_trace(profile)
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            state = one_step(state)
            times.append(time.perf_counter() - t0)
    finally:
        if profile:
            jax.profiler.stop_trace()
        if real_data:
            batches.close()
            shutil.rmtree(prepared_dir, ignore_errors=True)
    faults_per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / steps
    median = statistics.median(times)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    flops = metrics.flops_per_token(cfg.model, cfg.data.seq_len)
    tokens_per_sec = tokens_per_step / median
    peak = metrics.device_peak_tflops(jax.devices()[0].device_kind, cfg.train.peak_tflops)
    memory = jax.devices()[0].memory_stats() or {}
    return {"params": metrics.param_count(state.params), "tokens_per_step": tokens_per_step,
            "step_time_s": median, "step_time_p10_s": float(np.percentile(times, 10)),
            "step_time_p90_s": float(np.percentile(times, 90)), "tokens_per_sec": tokens_per_sec,
            "model_tflops_per_sec": tokens_per_sec * flops / 1e12,
            "mfu": metrics.mfu(tokens_per_sec, flops, jax.device_count(), peak),
            "peak_memory_gib": memory["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in memory else None,
            "compile_s": compile_s, "step_memory": _step_memory(plan),
            "devices": f"{jax.device_count()} × {jax.devices()[0].device_kind}",
            "steps": steps, "real_data": real_data, "page_faults_per_step": faults_per_step,
            "malloc": runtime.malloc_mode}


def _step_memory(plan) -> dict | None:
    """What XLA planned for one step on one device, in bytes: state and batch in, results out (less what the
    donated state's buffers are reused for), scratch."""
    if plan is None:
        return None
    inputs, temp = plan.argument_size_in_bytes, plan.temp_size_in_bytes
    outputs = plan.output_size_in_bytes - plan.alias_size_in_bytes
    return {"total": inputs + outputs + temp, "inputs": inputs, "outputs": outputs, "temp": temp}


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def _real_batches(cfg: Config):
    """The experiment's training batches (prepared into a temporary directory unless data.prepared names one)."""
    from llm_jax.data import pipeline
    from llm_jax.data.prepare import Prepared, prepare
    tmp = Path(tempfile.mkdtemp(prefix="llm_jax_bench_"))
    data = Prepared.load(cfg.data.prepared) if cfg.data.prepared else prepare(cfg, tmp / "data")
    return pipeline.train_iterator(data, cfg.data.seq_len, cfg.train.batch_size, cfg.train.microbatches,
                                   cfg.train.seed, jax.process_index(), jax.process_count(),
                                   cfg.data.num_workers), tmp


def format_train(r: dict) -> str:
    def fmt(value, spec):
        return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)
    rows = [("devices", r["devices"]), ("parameters", f"{r['params']:,}"),
            ("tokens / step", f"{r['tokens_per_step']:,}"),
            ("step time (median)", f"{r['step_time_s'] * 1e3:.1f} ms"),
            ("step time (p10 - p90)", f"{r['step_time_p10_s'] * 1e3:.1f} - {r['step_time_p90_s'] * 1e3:.1f} ms"),
            ("tokens / s", f"{r['tokens_per_sec']:,.0f}"),
            ("model TFLOP/s", f"{r['model_tflops_per_sec']:.4g}"), ("MFU", fmt(r["mfu"], ".2%")),
            ("peak device memory", fmt(r["peak_memory_gib"], ".2f") + (" GiB" if r["peak_memory_gib"] else "")),
            ("step memory (XLA plan)", "n/a" if not r["step_memory"] else
             "{total} per device ({inputs} in, {outputs} out, {temp} scratch)".format(
                 **{k: _size(v) for k, v in r["step_memory"].items()})),
            ("compile time", f"{r['compile_s']:.1f} s"),
            # Host memory first touched per step: high when buffers are mapped afresh each step (runtime.py).
            ("host page faults / step", f"{r['page_faults_per_step']:,.0f}"),
            ("host malloc", f"{r['malloc']} (llm_jax/runtime.py; LLM_JAX_MALLOC)"),
            ("data", "pipeline (--real-data)" if r["real_data"] else "synthetic")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows) + f"\n({r['steps']} timed steps)"


def torch_reference():
    """benchmarks/torch_reference.py (PyTorch is an optional extra: pip install -e '.[torch]')."""
    if importlib.util.find_spec("torch") is None:
        raise ConfigError("--compare-torch needs PyTorch: pip install -e '.[torch]'")
    spec = importlib.util.spec_from_file_location("llm_jax_torch_reference", TORCH_REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_data(cfg: Config, batches: int = 50) -> dict:
    """Global tokens/s the pipeline delivers to the host, after its first batch (preparation not timed)."""
    iterator, tmp = _real_batches(cfg)
    try:
        next(iterator)
        t0 = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        elapsed = time.perf_counter() - t0
    finally:
        iterator.close()
        shutil.rmtree(tmp, ignore_errors=True)
    tokens = batches * cfg.train.batch_size * cfg.data.seq_len
    return {"batches": batches, "tokens_per_sec": tokens / elapsed, "batch_ms": elapsed / batches * 1e3}


def bench_generate(cfg: Config, prompt_len: int = 32, new_tokens: int = 128) -> dict[int, float]:
    """Decode tokens/s with the KV cache (greedy, random weights) at batch 1 and 16."""
    from flax import linen as nn
    from llm_jax.generate import Generator, Sampling
    dummy = np.zeros((1, 8), np.int32)
    params = nn.unbox(Transformer(cfg.model).init(jax.random.key(0), dummy, dummy, dummy + 1))["params"]
    generator = Generator(cfg.model, params, Sampling(temperature=0))
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
    import grain
    _, state, _ = _setup(cfg)
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


def bench_memory(cfg: Config, limit_gib: float | None = None, max_compiles: int = 8) -> dict:
    """The largest global batch (a multiple of what the mesh and microbatches allow) whose step XLA plans
    within `limit_gib` per device (default: the device's memory limit, or on CPU the host memory shared by
    the local devices). Returns the plans compiled, {batch: bytes per device}, and the answer."""
    if cfg.data.format != "text":
        raise ConfigError("bench memory plans next-token pretraining (data.format=text)")
    mesh = sharding.make_mesh(cfg.mesh)
    model, optimizer = Transformer(cfg.model), optim.make_optimizer(cfg.optim, cfg.train.steps)
    state_shardings = sharding.tree_shardings(check_fits(model, optimizer, mesh, cfg.data.seq_len), mesh)
    _, abstract = logical_specs(model, optimizer, cfg.data.seq_len)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_shardings)
    train_fn = step.jit_train_step(model, optimizer, optim.schedule(cfg.optim, cfg.train.steps), mesh,
                                   state_shardings, NEXT_TOKEN)
    batch_shardings = step.batch_shardings(mesh, NEXT_TOKEN, microbatched=True)
    rows_per_device = int(np.prod([mesh.shape[a] for a in sharding.mesh_axes_for("batch")]))
    granule = cfg.train.microbatches * int(np.lcm(rows_per_device, jax.process_count()))
    limit = limit_gib * 2**30 if limit_gib else _device_memory_limit()

    dtypes = {k: v.dtype for k, v in synthetic_batch(cfg).items()}
    plans = {}

    def fits(batch: int) -> bool:
        M, T = cfg.train.microbatches, cfg.data.seq_len
        example = {k: jax.ShapeDtypeStruct((M, batch // M, T), dtype, sharding=batch_shardings[k])
                   for k, dtype in dtypes.items()}
        plans[batch] = _step_memory(train_fn.lower(state, example).compile().memory_analysis())["total"]
        return plans[batch] <= limit

    batch = max(granule, cfg.train.batch_size // granule * granule)
    good, bad = (batch, None) if fits(batch) else (None, batch)
    while good is not None and bad is None and len(plans) < max_compiles:  # double while it fits
        if fits(good * 2):
            good *= 2
        else:
            bad = good * 2
    while good is None and bad > granule and len(plans) < max_compiles:  # halve until it fits
        half = max(granule, bad // 2 // granule * granule)
        if fits(half):
            good = half
        else:
            bad = half
    while good and bad and bad - good > granule and len(plans) < max_compiles:
        mid = (good + bad) // 2 // granule * granule
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return {"plans": dict(sorted(plans.items())), "largest": good, "smallest_too_big": bad, "limit": limit,
            "granule": granule}


def _device_memory_limit() -> float:
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return float(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / jax.local_device_count()


def format_memory(r: dict) -> str:
    lines = [f"{'global batch':>12}  {'step memory per device (XLA plan)':>34}"]
    lines += [f"{b:>12}  {_size(v):>34}{'' if v <= r['limit'] else '  (does not fit)'}" for b, v in r["plans"].items()]
    if r["largest"] is None:
        lines.append(f"no batch (multiple of {r['granule']}) fits in {_size(r['limit'])} per device")
    else:
        exact = r["smallest_too_big"] is not None and r["smallest_too_big"] - r["largest"] <= r["granule"]
        lines.append(f"largest batch that fits: {r['largest']} ({_size(r['plans'][r['largest']])} of "
                     f"{_size(r['limit'])} per device){'' if exact else ' (search stopped before the exact limit)'}")
    return "\n".join(lines)
