"""The host training loop: build everything once, then dispatch steps, reading metrics one step behind.

The device never waits for the host: step t is dispatched before step t-1's metrics are fetched.
TensorBoard, the console and files in the run directory are written by process 0 only.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import jax
from tqdm import tqdm

from llm_jax import compression, losses, metrics, optim, sharding, step
from llm_jax.config import Config, ConfigError, to_json, validate
from llm_jax.data.pipeline import eval_batches, eval_text, train_iterator
from llm_jax.data.prepare import Prepared, prepare
from llm_jax.model import Transformer
from llm_jax.state import check_fits, create_state


class RunDirError(ValueError):
    """The run directory cannot be used as asked."""


@dataclass
class Setup:
    """Everything the loop needs, built (and checked) once before the first step."""
    cfg: Config
    mesh: jax.sharding.Mesh
    prepared: Prepared
    state: object
    train_fn: object
    eval_fn: object
    n_params: int


def is_main() -> bool:
    return jax.process_index() == 0


def check_batch(cfg: Config, mesh) -> None:
    micro = cfg.train.batch_size // cfg.train.microbatches
    sharding.check_divisible(f"train.batch_size={cfg.train.batch_size} / train.microbatches="
                             f"{cfg.train.microbatches}", (micro,), ("batch",), mesh)
    if micro % jax.process_count():
        raise ConfigError(f"train.batch_size / train.microbatches = {micro} is not divisible by the "
                          f"{jax.process_count()} processes")


def load_data(cfg: Config, run_dir: Path) -> Prepared:
    """A `llm-jax prepare` directory if the config names one, else tokenize once into RUN_DIR/data."""
    if cfg.data.prepared:
        prepared = Prepared.load(Path(cfg.data.prepared))
    else:
        if is_main():
            prepare(cfg, run_dir / "data")
        _barrier("prepared")
        prepared = Prepared.load(run_dir / "data")
    if prepared.tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"the tokenizer has {prepared.tokenizer.vocab_size} pieces but model.vocab_size="
                          f"{cfg.model.vocab_size}; raise model.vocab_size")
    return prepared


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def start_run_dir(run_dir: Path) -> bool:
    """Creates the run directory; returns whether it is new (and so may be removed if setup fails)."""
    if (run_dir / "config.json").exists():
        raise RunDirError(f"run directory {run_dir} already holds a run; choose another --run-dir")
    new = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    return new


def build(cfg: Config, run_dir: Path, devices=None) -> Setup:
    """Validates, checks the mesh and every dimension, prepares data, then creates the sharded state."""
    cfg = validate(cfg)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    check_batch(cfg, mesh)
    model = Transformer(cfg.model)
    optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
    check_fits(model, optimizer, mesh, cfg.data.seq_len)
    new_dir = start_run_dir(run_dir) if is_main() else False
    try:
        prepared = load_data(cfg, run_dir)
    except Exception:
        if new_dir:  # a run that never started leaves nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    state, shardings = create_state(model, optimizer, mesh, cfg.data.seq_len,
                                    jax.random.key(cfg.train.seed))
    train_fn = step.jit_train_step(model, optimizer, optim.schedule(cfg.optim, cfg.train.steps), mesh,
                                   shardings)
    eval_fn = step.jit_eval_step(model, mesh, shardings.params)
    return Setup(cfg, mesh, prepared, state, train_fn, eval_fn, metrics.param_count(state.params))


def evaluate(setup: Setup, params, max_batches: int) -> tuple[dict, int]:
    """Summed nats/tokens/bytes over the held-out split; also returns how many windows were scored."""
    cfg = setup.cfg
    batches = eval_batches(setup.prepared, cfg.data.seq_len, cfg.train.batch_size, jax.process_index(),
                           jax.process_count(), max_batches)
    batch_sharding = sharding.logical_sharding(setup.mesh, "batch", "length")
    totals = None
    for local in batches:
        sums = setup.eval_fn(params, sharding.global_batch(local, batch_sharding))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    # The last batch may be padded: count only windows that exist.
    n_windows = min(len(batches) * cfg.train.batch_size,
                    (len(setup.prepared.eval_tokens()) - 1) // cfg.data.seq_len)
    return totals, n_windows


def eval_scalars(sums: dict) -> dict[str, float]:
    rates = losses.compression(sums)
    return {"eval/bits_per_token": float(rates["bits_per_token"]),
            "eval/bits_per_byte": float(rates["bits_per_byte"])}


class PerfMeter:
    """Step time, tokens/s and MFU over windows of steps, skipping the window holding compilation."""

    def __init__(self, cfg: Config, n_devices: int):
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        self.flops_per_token = metrics.flops_per_token(cfg.model, cfg.data.seq_len)
        self.peak = metrics.device_peak_tflops(jax.devices()[0].device_kind, cfg.train.peak_tflops)
        self.n_devices = n_devices
        self.t0, self.step0 = None, None
        self.last: dict[str, float] = {}

    def update(self, step_done: int) -> dict[str, float]:
        now = time.perf_counter()
        out = {}
        if self.t0 is not None and step_done > self.step0:
            step_time = (now - self.t0) / (step_done - self.step0)
            tokens_per_sec = self.tokens_per_step / step_time
            out = {"perf/step_time_s": step_time, "perf/tokens_per_sec": tokens_per_sec,
                   "perf/mfu": metrics.mfu(tokens_per_sec, self.flops_per_token, self.n_devices, self.peak)}
            self.last = out
        self.t0, self.step0 = now, step_done
        return out


def _describe(setup: Setup) -> str:
    cfg, mesh = setup.cfg, setup.mesh
    shape = "×".join(f"{k}={v}" for k, v in mesh.shape.items())
    return (f"{cfg.name}: {setup.n_params / 1e6:.2f}M params, {jax.device_count()} × "
            f"{jax.devices()[0].device_kind} ({jax.process_count()} process), mesh {shape}, "
            f"{cfg.train.batch_size}×{cfg.data.seq_len} tokens/step, "
            f"{len(setup.prepared.train_tokens()):,} train / {len(setup.prepared.eval_tokens()):,} eval tokens")


def train(cfg: Config, run_dir: Path, devices=None) -> dict:
    """Runs a whole training job; returns the final results (also written to RUN_DIR/results.json)."""
    run_dir = Path(run_dir)
    setup = build(cfg, run_dir, devices)
    cfg = setup.cfg
    writer = metrics.Writer(run_dir / "tb", enabled=is_main())
    if is_main():
        (run_dir / "config.json").write_text(to_json(cfg))
        shutil.copy(setup.prepared.tokenizer_path, run_dir / "tokenizer.model")
        writer.text("config", f"```json\n{to_json(cfg)}\n```")
        print(_describe(setup), flush=True)
    state = _train_steps(setup, writer)
    results = _final_eval(setup, state, writer)
    writer.close()
    if is_main():
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _train_steps(setup: Setup, writer: metrics.Writer):
    cfg, state = setup.cfg, setup.state
    batches = train_iterator(setup.prepared, cfg.data.seq_len, cfg.train.batch_size, cfg.train.microbatches,
                             cfg.train.seed, jax.process_index(), jax.process_count(), cfg.data.num_workers)
    batch_sharding = sharding.logical_sharding(setup.mesh, "microbatch", "batch", "length")
    perf = PerfMeter(cfg, jax.device_count())
    bar = tqdm(total=cfg.train.steps, disable=not is_main(), unit="step", dynamic_ncols=True)
    pending = None
    try:
        for i in range(cfg.train.steps):
            state, step_metrics = setup.train_fn(state, sharding.global_batch(next(batches), batch_sharding))
            if pending is not None:
                _log_train(pending, perf, writer, bar, cfg)
            pending = (i + 1, step_metrics)
            if (i + 1) % cfg.train.eval_every == 0 and i + 1 < cfg.train.steps:
                _log_train(pending, perf, writer, bar, cfg)
                pending = None
                sums, _ = evaluate(setup, state.params, cfg.train.eval_batches)
                writer.scalars(i + 1, eval_scalars(sums))
                perf.t0 = None  # evaluation time is not step time
        if pending is not None:
            _log_train(pending, perf, writer, bar, cfg)
    finally:
        bar.close()
        batches.close()  # grain worker processes and their shared memory
    return state


def _log_train(pending, perf: PerfMeter, writer, bar, cfg: Config) -> None:
    step_done, step_metrics = pending
    values = {k: float(v) for k, v in jax.device_get(step_metrics).items() if k != "train/tokens"}
    if step_done == 1 or step_done % cfg.train.log_every == 0:
        values.update(perf.update(step_done))
    writer.scalars(step_done, values)
    bar.update(1)
    bar.set_postfix(bpb=f"{values['train/bits_per_byte']:.3f}",
                    tok_s=f"{perf.last.get('perf/tokens_per_sec', float('nan')):,.0f}", refresh=False)


def _final_eval(setup: Setup, state, writer: metrics.Writer) -> dict:
    cfg = setup.cfg
    sums, n_windows = evaluate(setup, state.params, cfg.train.eval_batches)
    scores = eval_scalars(sums)
    writer.scalars(cfg.train.steps, scores)
    results = {**scores, "eval/tokens": sums["tokens"], "eval/bytes": sums["bytes"],
               "params": setup.n_params, "steps": cfg.train.steps}
    if is_main():
        held_out = eval_text(setup.prepared, cfg.data.seq_len, n_windows)
        if len(held_out) != int(sums["bytes"]):
            raise RuntimeError(f"held-out text has {len(held_out)} bytes but the model was scored on "
                               f"{int(sums['bytes'])}: the byte table and the data disagree")
        baselines = compression.baselines(held_out)
        writer.scalars(cfg.train.steps, {f"compare/{k}_bits_per_byte": v for k, v in baselines.items()})
        results["baselines_bits_per_byte"] = baselines
        print(f"\nheld-out split: {len(held_out):,} bytes, {int(sums['tokens']):,} tokens")
        print(compression.format_comparison(scores["eval/bits_per_byte"], baselines), flush=True)
    return results
