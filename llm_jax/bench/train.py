"""`llm-jax bench train`: how fast the train step is, for any task.

Compiles once, runs warm-up steps, then times N steps of the real train step (same jit, shardings, optimizer
and objective as `train`) on synthetic batches of the task's own type, so the data pipeline is not measured
(--real-data: batches from the task's source, fetched inside the timed loop); --compare-torch also times the
PyTorch eager reference (benchmarks/torch_reference.py) of the same model, in three blocks alternating with
llm_jax's, with the CPU, both runtimes' threads and the other processes' load, and prints the ratio as the last
line; --profile DIR writes a jax.profiler trace of the timed steps for TensorBoard's profile plugin.

Model TFLOP/s and MFU use the task's flops_per_token and the peak table (the formula of TensorBoard's
perf/mfu); MFU is NaN where the device's peak is unknown (CPU) unless train.peak_tflops gives one.

The setup, the batches and the step-memory figures here are shared with bench memory and bench checkpoint.
"""
from __future__ import annotations

import contextlib
import importlib.util
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from llm_jax import runtime, tasks
from llm_jax.bench import host
from llm_jax.config import REPO_ROOT, Config
from llm_jax.errors import ConfigError
from llm_jax.parallel import sharding
from llm_jax.tasks.base import Task
from llm_jax.train import metrics, optim, peft, step
from llm_jax.train.setup import check_batch, load_data
from llm_jax.train.state import abstract_params, abstract_state, create_state

TORCH_REFERENCE = REPO_ROOT / "benchmarks" / "torch_reference.py"


class Bench(NamedTuple):
    """What bench train, memory and checkpoint run: built by `bench_setup` as `train` builds it."""
    task: Task
    mesh: jax.sharding.Mesh
    state: Any
    frozen: dict  # stand-ins for the task's frozen params (DPO's reference, a peft run's base): constants
    train_fn: Any  # (state, batch, frozen) -> (state, metrics)


def bench_setup(cfg: Config, abstract: bool = False) -> Bench:
    """The task, mesh, train state and jitted train step of `cfg`, as `train` builds them (abstract: the
    state's shapes, dtypes and shardings, nothing allocated)."""
    # Not checked: the task's data requirements matter only to real_source, which checks them.
    task = tasks.make(cfg, check=False)
    mesh = sharding.make_mesh(cfg.mesh)
    model = tasks.model_of(cfg)
    optimizer = optim.make_optimizer(cfg.optim)
    check_batch(cfg, mesh)
    select = peft.trainable(cfg)
    layout = abstract_state(model, optimizer, mesh, cfg.data.seq_len, select)
    # The frozen params a run reads (DPO's reference, a peft run's base) have the model's shapes, less what trains.
    frozen_layout = abstract_params(model, mesh, cfg.data.seq_len)
    frozen = {name: peft.frozen_part(frozen_layout) if peft.enabled(cfg) else frozen_layout
              for name in task.frozen_exports()}
    if peft.enabled(cfg):
        frozen[peft.BASE] = peft.base_layout(cfg, frozen_layout)
    if abstract:
        state, shardings = layout, jax.tree.map(lambda a: a.sharding, layout)
    else:
        state, shardings = create_state(model, optimizer, layout, cfg.data.seq_len, jax.random.key(cfg.train.seed),
                                        select)
        frozen = jax.tree.map(lambda a: jnp.full(a.shape, 0.01, a.dtype, device=a.sharding), frozen)
    train_fn = step.jit_train_step(model, optimizer, cfg.optim, mesh, shardings, task,
                                   jax.tree.map(lambda a: a.sharding, frozen))
    return Bench(task, mesh, state, frozen, train_fn)


def synthetic_batch(task: Task, batch_size: int | None = None, seed: int = 0):
    """A global batch of random examples of the task's batch type, (microbatches, batch / microbatches, ...)
    per entry (default: train.batch_size rows)."""
    c = task.cfg
    M = c.train.microbatches
    return task.batch_type.synthetic((M, (batch_size or c.train.batch_size) // M), c.data.seq_len,
                                     c.model.vocab_size, np.random.default_rng(seed))


@contextlib.contextmanager
def real_source(task: Task):
    """The task's training batch source (data prepared into a temporary directory unless data.prepared names
    a directory), closed and removed on exit."""
    task.check()
    with tempfile.TemporaryDirectory(prefix="llm_jax_bench_", ignore_cleanup_errors=True) as tmp:
        source = task.train_source(load_data(task, Path(tmp)), jax.process_index(), jax.process_count())
        try:
            yield source
        finally:
            source.close()


def bench_train(cfg: Config, steps: int = 20, warmup: int = 3, real_data: bool = False,
                profile: str | None = None, blocks: int = 1, between=None) -> dict:
    """Times the train step in `blocks` blocks of `steps` steps, each after `warmup` untimed ones, calling
    `between(block)` after each (--compare-torch times PyTorch there); returns the figures `format_train`
    prints, over all timed steps, and each block's median."""
    bench = bench_setup(cfg)
    shardings = step.batch_shardings(bench.mesh, bench.task, microbatched=True)
    with contextlib.ExitStack() as stack:
        if real_data:
            source = stack.enter_context(real_source(bench.task))
            next_batch = lambda state: sharding.global_batch(source.next_batch(state), shardings)
        else:
            fixed = sharding.global_batch(synthetic_batch(bench.task), shardings)
            next_batch = lambda state: fixed
        t0 = time.perf_counter()
        compiled = bench.train_fn.lower(bench.state, next_batch(bench.state), bench.frozen).compile()
        compile_s = time.perf_counter() - t0
        run_step = lambda s, b: compiled(s, b, bench.frozen)  # noqa: E731
        state, times, faults, block_medians, others = bench.state, [], [], [], []
        for b in range(blocks):
            before = host.busy_now()
            state, block_times, block_faults = _run_steps(run_step, state, next_batch, steps, warmup,
                                                          profile if b == 0 else None)
            others.append(host.others_cores(before, host.busy_now()))
            times += block_times
            faults.append(block_faults)
            block_medians.append(statistics.median(block_times))
            if between:
                between(b)
    median = statistics.median(times)
    tokens_per_sec = bench.task.tokens_per_step / median
    flops = bench.task.flops_per_token
    peak = metrics.device_peak_tflops(jax.devices()[0].device_kind, cfg.train.peak_tflops)
    memory = jax.devices()[0].memory_stats() or {}
    return {"params": metrics.param_count(state.params), "tokens_per_step": bench.task.tokens_per_step,
            "step_time_s": median, "step_time_p10_s": float(np.percentile(times, 10)),
            "step_time_p90_s": float(np.percentile(times, 90)), "tokens_per_sec": tokens_per_sec,
            "model_tflops_per_sec": tokens_per_sec * flops / 1e12,
            "mfu": metrics.mfu(tokens_per_sec, flops, jax.device_count(), peak),
            "peak_memory_gib": memory["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in memory else None,
            "compile_s": compile_s, "step_memory": step_memory(compiled.memory_analysis()),
            "devices": f"{jax.device_count()} × {jax.devices()[0].device_kind}",
            "steps": steps * blocks, "real_data": real_data, "page_faults_per_step": statistics.median(faults),
            "malloc": runtime.malloc_mode, "block_step_time_s": block_medians, "block_others_cores": others,
            "xla_threads": host.thread_counts().get("tf_XLAEigen", 0)}


def _run_steps(run_step, state, next_batch, steps: int, warmup: int, profile: str | None):
    """The compiling step's first run and `warmup` more, untimed, then `steps` timed ones (traced into
    `profile`); returns the last state, each timed step's seconds and the median host page faults of a timed
    step (the steady state: a step now and then grows the heap once more, which a mean would spread over all)."""
    def one_step(s):
        s, m = run_step(s, next_batch(s))
        jax.block_until_ready(m)
        return s

    for _ in range(1 + warmup):
        state = one_step(state)
    times, faults = [], []
    with jax.profiler.trace(profile) if profile else contextlib.nullcontext():
        for _ in range(steps):
            faults_before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            state = one_step(state)
            times.append(time.perf_counter() - t0)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)
    return state, times, statistics.median(faults)


def step_memory(plan) -> dict | None:
    """What XLA planned for one step on one device, in bytes: state and batch in, results out (less what the
    donated state's buffers are reused for), scratch."""
    if plan is None:
        return None
    inputs, temp = plan.argument_size_in_bytes, plan.temp_size_in_bytes
    outputs = plan.output_size_in_bytes - plan.alias_size_in_bytes
    return {"total": inputs + outputs + temp, "inputs": inputs, "outputs": outputs, "temp": temp}


def format_bytes(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


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
                 **{k: format_bytes(v) for k, v in r["step_memory"].items()})),
            ("compile time", f"{r['compile_s']:.1f} s"),
            # Host memory first touched per step: high when buffers are mapped afresh each step (runtime.py).
            ("host page faults / step (median)", f"{r['page_faults_per_step']:,.0f}"),
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


def run(cfg: Config, steps: int = 20, warmup: int = 3, real_data: bool = False, profile: str | None = None,
        compare_torch: bool = False) -> str:
    """What `llm-jax bench train` prints."""
    if compare_torch:
        return compare(cfg, steps, warmup, real_data, profile)
    result = bench_train(cfg, steps, warmup, real_data, profile)
    lines = [f"bench train {cfg.name}", format_train(result)]
    if profile:
        lines.append(f"profile: tensorboard --logdir {profile}  (Profile tab)")
    return "\n".join(lines)


def compare(cfg: Config, steps: int, warmup: int, real_data: bool, profile: str | None, blocks: int = 3) -> str:
    """llm_jax's step and the PyTorch reference's, timed in alternating blocks (jax, torch, jax, ...), so a
    change in the machine's load or clock over the run reaches both sides alike; the ratio is the last line.

    In one process, so PyTorch runs under the same malloc settings as llm_jax (runtime.py).
    """
    if tasks.TASKS[cfg.task].head != "lm":
        raise ConfigError(f"--compare-torch: the PyTorch reference is a language model, task={cfg.task} is not")
    if cfg.optim.optimizer != "adamw":
        raise ConfigError(f"--compare-torch: the PyTorch reference trains with AdamW, not optim.optimizer="
                          f"{cfg.optim.optimizer} (add --set optim.optimizer=adamw)")
    module = torch_reference()
    try:
        timer = module.Timer(cfg.model, cfg.optim, cfg.train.batch_size, cfg.data.seq_len, seed=cfg.train.seed)
    except ValueError as e:  # a model the reference does not implement
        raise ConfigError(f"--compare-torch: {e}") from None
    torch_side = {"blocks": [], "others": []}

    def time_torch(_block):
        before = host.busy_now()
        torch_side["blocks"].append(statistics.median(timer.block(steps, warmup + 1)))  # as llm_jax's
        torch_side["others"].append(host.others_cores(before, host.busy_now()))

    result = bench_train(cfg, steps, warmup, real_data, profile, blocks, time_torch)
    info = host.torch_build(timer.threads)
    lines = [f"bench train {cfg.name}", format_train(result)]
    if profile:
        lines.append(f"profile: tensorboard --logdir {profile}  (Profile tab, first block)")
    lines += [f"host: {host.describe(host.cpu_description())}; {host.describe_env(host.thread_env())}",
              f"llm_jax runtime: jax {jax.__version__}, jaxlib {jaxlib.__version__}; {result['xla_threads']} XLA:CPU "
              f"intra-op threads; {result['params']:,} parameters",
              f"PyTorch runtime: torch {info['version']}; {info['threads']} intra-op threads "
              f"({info['parallel_backend']}), {info['interop_threads']} inter-op; MKL {info['mkl'] or 'absent'}, "
              f"oneDNN {info['onednn'] or 'absent'}{'' if info['onednn_enabled'] else ' (disabled)'}; "
              f"kernels {info['cpu_capability']}; "
              f"{module.param_count(timer.model):,} parameters"]
    return "\n".join(lines + format_blocks(result, torch_side, steps, warmup))


def format_blocks(result: dict, torch_side: dict, steps: int, warmup: int) -> list[str]:
    """Each block's median on each side, with the CPU other processes took meanwhile; then each side's median
    and minimum over the blocks and their ratios."""
    sides = {"llm_jax": result["block_step_time_s"], "PyTorch": torch_side["blocks"]}
    others = result["block_others_cores"] + torch_side["others"]
    lines = [f"timed blocks, alternating ({steps} steps each after {warmup + 1} untimed; in brackets the cores "
             "other processes used meanwhile):"]
    for b, (j, t) in enumerate(zip(*sides.values())):
        lines.append(f"  block {b + 1}: llm_jax {j * 1e3:.1f} ms/step ({result['block_others_cores'][b]:.2f}), "
                     f"PyTorch {t * 1e3:.1f} ms/step ({torch_side['others'][b]:.2f})")
    if max(others) > 0.1:
        lines.append(f"warning: other processes used up to {max(others):.2f} cores while timing: these are not "
                     "an idle machine's figures")
    tokens = result["tokens_per_step"]
    for name, medians in sides.items():
        median = statistics.median(medians)
        lines.append(f"{name + ':':<9} median {median * 1e3:.1f} ms/step ({tokens / median:,.0f} tokens/s), "
                     f"min {min(medians) * 1e3:.1f} ms/step ({tokens / min(medians):,.0f} tokens/s)")
    ratio = statistics.median(sides["PyTorch"]) / statistics.median(sides["llm_jax"])
    lines.append(f"llm_jax/torch tokens/s ratio: {ratio:.2f} (medians of {len(sides['llm_jax'])} blocks), "
                 f"{min(sides['PyTorch']) / min(sides['llm_jax']):.2f} (minimums)")
    return lines
