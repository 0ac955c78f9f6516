"""The host training loop: build everything once, then dispatch steps, reading metrics one step behind.

The device never waits for the host: step t is dispatched before step t-1's metrics are fetched, and
batch t+1 is fetched and its host-to-device copy started while step t runs. The pipeline is never more
than that one batch ahead, so the data position a checkpoint saves is exact.
TensorBoard, the console and files in the run directory are written by process 0 only.

A run directory with checkpoints is resumed from its latest readable one; SIGTERM/SIGINT save a
checkpoint at the next step boundary and end the run (llm_jax/preemption.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import jax
from tqdm import tqdm

from llm_jax import checkpoint, compression, losses, metrics, optim, reward, sharding, step
from llm_jax.config import Config, ConfigError, from_dict, to_json, validate
from llm_jax.data import pipeline, preference, sft
from llm_jax.data.prepare import Prepared, prepare
from llm_jax.model import Transformer
from llm_jax.preemption import Preempted, PreemptionWatch
from llm_jax.state import check_fits, create_state


NONFINITE_EXIT = 3


class RunDirError(ValueError):
    """The run directory cannot be used as asked."""


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient or update under train.nonfinite=stop."""


@dataclass
class Setup:
    """Everything the loop needs, built (and checked) once before the first step."""
    cfg: Config
    run_dir: Path
    mesh: jax.sharding.Mesh
    prepared: Prepared
    state: object
    start_step: int
    objective: losses.Objective
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


def batches_module(cfg: Config):
    """Documents and dialogues differ in packing, not in the batches they yield (same keys, same shapes);
    preference pairs yield (pairs, 2, T) batches for the reward objective."""
    return {"text": pipeline, "dialogue": sft, "preference": preference}[cfg.data.format]


def objective(cfg: Config) -> losses.Objective:
    return reward.objective(cfg.reward) if cfg.model.head == "reward" else losses.NEXT_TOKEN


def with_init_from(cfg: Config) -> Config:
    """Fine-tuning an export: its model (with this config's head) and tokenizer are the ones to train."""
    if not cfg.checkpoint.init_from:
        return cfg
    export = Path(cfg.checkpoint.init_from)
    if not (export / "config.json").is_file():
        raise ConfigError(f"checkpoint.init_from={export}: not an export directory (no config.json); "
                          "make one with `llm-jax export`")
    saved = from_dict(json.loads((export / "config.json").read_text()))
    head = {f: getattr(cfg.model, f) for f in checkpoint.HEAD_FIELDS}
    return dataclasses.replace(cfg, model=dataclasses.replace(saved.model, **head),
                               data=dataclasses.replace(cfg.data, tokenizer=str(export / "tokenizer.model")))


def load_data(cfg: Config, run_dir: Path):
    """A `llm-jax prepare` directory if the config names one, else tokenize once into RUN_DIR/data."""
    if cfg.data.format in ("dialogue", "preference"):
        if not cfg.data.tokenizer:
            raise ConfigError(f"data.format={cfg.data.format} needs the pretrained model's tokenizer (with its chat "
                              "tokens): set checkpoint.init_from=EXPORT or data.tokenizer=PATH")
        make, kind = ((sft.prepare_sft, sft.PreparedSFT) if cfg.data.format == "dialogue" else
                      (preference.prepare_preference, preference.PreparedPreference))
        if is_main():
            make(cfg, run_dir / "data", cfg.data.tokenizer)
        _barrier("prepared")
        prepared = kind.load(run_dir / "data")
    elif cfg.data.prepared:
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


def open_run_dir(run_dir: Path, fresh: bool) -> tuple[bool, bool]:
    """(resume, created): resume when the directory holds a run with checkpoints; --fresh deletes it first."""
    if fresh and run_dir.exists() and is_main():
        shutil.rmtree(run_dir)
    _barrier("fresh")
    if (run_dir / "config.json").exists():
        if not checkpoint.committed_steps(run_dir):
            raise RunDirError(f"run directory {run_dir} holds a run with no checkpoint to resume; "
                              "pass --fresh to delete it and start over")
        return True, False
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"cannot create run directory {run_dir}: {e.strerror or e}") from None
    return False, created


def build(cfg: Config, run_dir: Path, devices=None, fresh: bool = False) -> Setup:
    """Validates, checks the mesh and every dimension, prepares data, creates or restores the sharded state."""
    cfg = validate(with_init_from(cfg))
    mesh = sharding.make_mesh(cfg.mesh, devices)
    check_batch(cfg, mesh)
    model = Transformer(cfg.model)
    optimizer = optim.make_optimizer(cfg.optim, cfg.train.steps)
    check_fits(model, optimizer, mesh, cfg.data.seq_len)
    resume, created = open_run_dir(run_dir, fresh)
    try:
        prepared = load_data(cfg, run_dir)
        state, shardings = create_state(model, optimizer, mesh, cfg.data.seq_len, jax.random.key(cfg.train.seed))
        if is_main():
            checkpoint.check_writable(run_dir, checkpoint.estimated_bytes(state), cfg.checkpoint.keep)
    except Exception:
        if created:  # a run that never started leaves nothing behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    state, start_step = _initial_state(cfg, run_dir, resume, state, prepared)
    task = objective(cfg)
    train_fn = step.jit_train_step(model, optimizer, optim.schedule(cfg.optim, cfg.train.steps), mesh,
                                   shardings, task)
    eval_fn = step.jit_eval_step(model, mesh, shardings.params, task)
    return Setup(cfg, run_dir, mesh, prepared, state, start_step, task, train_fn, eval_fn,
                 metrics.param_count(state.params))


def _initial_state(cfg: Config, run_dir: Path, resume: bool, state, prepared: Prepared):
    if resume:
        restored = checkpoint.restore_latest(run_dir, cfg, state, prepared.tokenizer)
        if restored is None:
            raise RunDirError(f"run directory {run_dir} has no readable checkpoint left (damaged ones are in "
                              f"{run_dir / 'corrupt_checkpoints'}); pass --fresh to start over")
        return restored
    if cfg.checkpoint.init_from:
        params, fresh = checkpoint.load_params(Path(cfg.checkpoint.init_from), cfg, state.params)
        if fresh and is_main():
            print(f"init_from {cfg.checkpoint.init_from}: {', '.join(fresh)} initialised fresh (not in the export)")
        return state.replace(params=params), 0
    return state, 0


def evaluate(setup: Setup, params, max_batches: int) -> tuple[dict, int]:
    """The objective's sums over the held-out split (e.g. nats/tokens/bytes); also how many batches were scored."""
    cfg = setup.cfg
    batches = batches_module(cfg).eval_batches(setup.prepared, cfg.data.seq_len, cfg.train.batch_size,
                                               jax.process_index(), jax.process_count(), max_batches)
    shardings = step.batch_shardings(setup.mesh, setup.objective, microbatched=False)
    totals = None
    for local in batches:
        sums = setup.eval_fn(params, sharding.global_batch(local, shardings))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    return totals, len(batches)


@dataclass
class Evaluation:
    step: int
    sums: dict
    n_batches: int
    scores: dict[str, float]  # the objective's eval/ scalars


def evaluate_and_log(setup: Setup, params, writer: metrics.Writer, step_done: int) -> Evaluation:
    sums, n_batches = evaluate(setup, params, setup.cfg.train.eval_batches)
    scores = {k: float(v) for k, v in setup.objective.scalars(sums, "eval").items()}
    writer.scalars(step_done, scores)
    return Evaluation(step_done, sums, n_batches, scores)


def _describe(setup: Setup) -> str:
    cfg, mesh = setup.cfg, setup.mesh
    shape = "×".join(f"{k}={v}" for k, v in mesh.shape.items())
    start = f", resuming from step {setup.start_step}" if setup.start_step else ""
    return (f"{cfg.name}: {setup.n_params / 1e6:.2f}M params, {jax.device_count()} × "
            f"{jax.devices()[0].device_kind} ({jax.process_count()} process), mesh {shape}, "
            f"{cfg.train.batch_size}{' pairs × 2' if cfg.model.head == 'reward' else ''}×{cfg.data.seq_len} "
            "tokens/step, "
            f"{_data_summary(setup.prepared)}{start}")


def _data_summary(prepared) -> str:
    if isinstance(prepared, preference.PreparedPreference):
        train, held = prepared.meta["splits"]["train"], prepared.meta["splits"]["eval"]
        return f"{train['pairs']:,} train / {held['pairs']:,} eval preference pairs"
    if isinstance(prepared, sft.PreparedSFT):
        train, held = prepared.meta["splits"]["train"], prepared.meta["splits"]["eval"]
        return (f"{train['rows']:,} train / {held['rows']:,} eval rows of packed dialogues "
                f"({train['assistant_tokens']:,} assistant tokens to train on)")
    return f"{len(prepared.train_tokens()):,} train / {len(prepared.eval_tokens()):,} eval tokens"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def train(cfg: Config, run_dir: Path, devices=None, fresh: bool = False) -> dict:
    """Runs (or resumes) a training job; returns the final results (also in RUN_DIR/results.json)."""
    run_dir = Path(run_dir)
    setup = build(cfg, run_dir, devices, fresh)
    cfg = setup.cfg
    writer = metrics.Writer(run_dir / "tb", enabled=is_main(),
                            resume_step=setup.start_step if setup.start_step else None)
    if is_main():
        _write_atomic(run_dir / "config.json", to_json(cfg))
        shutil.copy(setup.prepared.tokenizer_path, run_dir / "tokenizer.model")
        if not setup.start_step:
            writer.text("config", f"```json\n{to_json(cfg)}\n```")
        print(_describe(setup), flush=True)
    mngr = checkpoint.manager(run_dir, cfg.checkpoint)
    try:
        with PreemptionWatch() as watch:
            state, last_eval = _train_steps(setup, writer, mngr, watch)
        results = _final_eval(setup, state, writer, last_eval)
    finally:
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
    if is_main():
        _write_atomic(run_dir / "results.json", json.dumps(results, indent=2))
    return results


def _train_steps(setup: Setup, writer: metrics.Writer, mngr, watch: PreemptionWatch):
    cfg, state = setup.cfg, setup.state
    batches = batches_module(cfg).train_iterator(
        setup.prepared, cfg.data.seq_len, cfg.train.batch_size, cfg.train.microbatches, cfg.train.seed,
        jax.process_index(), jax.process_count(), cfg.data.num_workers)
    if setup.start_step:
        how = checkpoint.restore_data(setup.run_dir, cfg, setup.start_step, batches)
        if is_main():
            print(f"resumed from checkpoint step {setup.start_step} (data position: {how})", flush=True)
    meta = checkpoint.meta(cfg, setup.prepared.tokenizer_path)
    batch_shardings = step.batch_shardings(setup.mesh, setup.objective, microbatched=True)
    perf = metrics.PerfMeter(cfg, jax.device_count())
    bar = tqdm(total=cfg.train.steps, initial=setup.start_step, disable=not is_main(), unit="step",
               dynamic_ncols=True)
    pending, last_eval = None, None
    log = lambda: _log_train(pending, perf, writer, bar, cfg, setup.objective.progress)
    try:
        for i in range(setup.start_step, cfg.train.steps):
            state, step_metrics = setup.train_fn(state, sharding.global_batch(next(batches), batch_shardings))
            if pending is not None:
                log()
            pending, done = (i + 1, step_metrics), i + 1
            preempted = watch.requested()
            every = cfg.checkpoint.every
            save_now = (every and done % every == 0) or done == cfg.train.steps or preempted
            eval_now = done % cfg.train.eval_every == 0 or done == cfg.train.steps
            if save_now or eval_now:  # see this step's metrics (and stop on a non-finite one) first
                log()
                pending = None
            if eval_now:  # before the save, so that the checkpoint carries its eval scores
                last_eval = evaluate_and_log(setup, state.params, writer, done)
                perf.t0 = None  # evaluation time is not step time
            if save_now:
                writer.flush()  # points up to this step reach disk before the checkpoint can commit
                t0 = time.perf_counter()
                scores = last_eval.scores if eval_now else {}
                checkpoint.save(mngr, state, batches, {**meta, "eval": scores} if scores else meta)
                writer.scalars(done, {"perf/checkpoint_save_s": time.perf_counter() - t0})
                perf.t0 = None  # a save is not step time
            if preempted:
                mngr.wait_until_finished()
                raise Preempted(done, watch.signal_name or "a signal on another process")
        if pending is not None:
            log()
    finally:
        bar.close()
        batches.close()  # grain worker processes and their shared memory
    return state, last_eval


def _log_train(pending, perf: metrics.PerfMeter, writer, bar, cfg: Config, progress: tuple[str, str]) -> None:
    step_done, step_metrics = pending
    fetched = jax.device_get(step_metrics)
    if not fetched.pop("train/finite") and cfg.train.nonfinite == "stop":
        raise NonFiniteError(f"non-finite loss, gradient or update at step {step_done} (train.nonfinite=stop); "
                             "the update was not applied and no checkpoint was written after it")
    values = {k: float(v) for k, v in fetched.items()}
    if step_done == 1 or step_done % cfg.train.log_every == 0:
        values.update(perf.update(step_done))
    writer.scalars(step_done, values)
    bar.update(1)
    label, key = progress
    bar.set_postfix({label: f"{values[key]:.3f}",
                     "tok_s": f"{perf.last.get('perf/tokens_per_sec', float('nan')):,.0f}"}, refresh=False)


def _final_eval(setup: Setup, state, writer: metrics.Writer, last_eval: Evaluation | None) -> dict:
    """The results of the run: the evaluation at its last step (made now if the loop did not reach it)."""
    cfg = setup.cfg
    if last_eval is None or last_eval.step != cfg.train.steps:  # resumed after the last step
        last_eval = evaluate_and_log(setup, state.params, writer, cfg.train.steps)
    sums, n_batches, scores = last_eval.sums, last_eval.n_batches, last_eval.scores
    counts = {f"eval/{k}": sums[k] for k in ("tokens", "bytes", "pairs") if k in sums}
    results = {**scores, **counts, "params": setup.n_params, "steps": cfg.train.steps,
               "skipped_steps": int(jax.device_get(state.skipped))}
    if is_main() and cfg.data.format == "text":  # compressors see whole texts; SFT scores answers only
        # The last batch may be padded: count only windows that exist.
        n_windows = min(n_batches * cfg.train.batch_size,
                        (len(setup.prepared.eval_tokens()) - 1) // cfg.data.seq_len)
        held_out = pipeline.eval_text(setup.prepared, cfg.data.seq_len, n_windows)
        if len(held_out) != int(sums["bytes"]):
            raise RuntimeError(f"held-out text has {len(held_out)} bytes but the model was scored on "
                               f"{int(sums['bytes'])}: the byte table and the data disagree")
        baselines = compression.baselines(held_out)
        writer.scalars(cfg.train.steps, {f"compare/{k}_bits_per_byte": v for k, v in baselines.items()})
        results["baselines_bits_per_byte"] = baselines
        print(f"\nheld-out split: {len(held_out):,} bytes, {int(sums['tokens']):,} tokens")
        print(compression.format_comparison(scores["eval/bits_per_byte"], baselines), flush=True)
    if is_main() and cfg.model.head == "reward":
        print(f"\nheld-out pairs: {int(sums['pairs']):,}, accuracy {scores['eval/accuracy']:.1%}, "
              f"{scores['eval/loss_bits_per_pair']:.3f} bits/pair, rewards {scores['eval/reward_mean']:+.3f} "
              f"± {scores['eval/reward_std']:.3f} (stored with the checkpoint for `llm-jax score`)", flush=True)
    return results
