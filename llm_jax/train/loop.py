"""The host training loop: build everything once (setup.py), then dispatch steps, reading metrics one step behind.

The device never waits for the host: step t is dispatched before step t-1's metrics are fetched, and
batch t+1 is fetched and its host-to-device copy started while step t runs. The batch source is never more
than that one batch ahead, so the data position a checkpoint saves is exact.
TensorBoard, the console and files in the run directory are written by process 0 only. What is trained,
evaluated and reported comes from the run's Task (tasks/); this loop is the same for all of them.

A run directory with checkpoints is resumed from its latest readable one; SIGTERM/SIGINT save a
checkpoint at the next step boundary and end the run (preemption.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
from tqdm import tqdm

from llm_jax.atomic import write_atomic
from llm_jax.config import Config, to_json
from llm_jax.errors import NonFiniteError, Preempted
from llm_jax.parallel import sharding
from llm_jax.parallel.distributed import is_main
from llm_jax.tasks.base import Evaluation
from llm_jax.train import checkpoint, metrics, peft, step
from llm_jax.train.budget import Budget, Clock, agree
from llm_jax.train.preemption import PreemptionWatch
from llm_jax.train.setup import Setup, build
from llm_jax.train.events import ReferenceLines, Writer
from llm_jax.train.state import with_planned_steps


def train(cfg: Config, run_dir: Path, devices=None, fresh: bool = False) -> dict:
    """Runs (or resumes) a training job; returns the final results (also in RUN_DIR/results.json)."""
    run_dir = Path(run_dir)
    setup = build(cfg, run_dir, devices, fresh)
    cfg = setup.cfg
    # An earlier attempt's points past the step this one starts from are about to be logged again: cut them.
    writer = Writer(run_dir / "tb", enabled=is_main(), resume_step=setup.start_step if setup.earlier_attempt else None)
    if is_main():
        if not setup.earlier_attempt:  # on disk before config.json, which marks an attempt as begun
            writer.text("config", f"```json\n{to_json(cfg)}\n```")
            writer.flush()
        write_atomic(run_dir / "config.json", to_json(cfg))
        write_atomic(run_dir / "tokenizer.model", setup.data.tokenizer_path.read_bytes())
        print(_describe(setup), flush=True)
    # Measured before training starts (process 0; cached with the prepared data), drawn at every evaluation.
    references = ReferenceLines(run_dir / "tb", setup.task.reference_lines(setup.data) if is_main() else {},
                                is_main(), setup.start_step if setup.earlier_attempt else None)
    mngr = checkpoint.manager(run_dir, cfg.checkpoint)
    clock = Clock(setup.time_before)
    try:
        with PreemptionWatch() as watch:
            state, last_eval = _train_steps(setup, writer, references, mngr, watch, clock)
        with clock.excluding("eval"):  # (evaluates again only when resumed from the last checkpoint)
            final = _final_eval(setup, state, last_eval)
        results = {**final, **clock.report()}
    finally:
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
        references.close()
    if is_main():
        write_atomic(run_dir / "results.json", json.dumps(results, indent=2))
    return results


def evaluate(setup: Setup, params, max_batches: int) -> tuple[dict, int]:
    """The objective's sums over the held-out split (e.g. nats/tokens/bytes); also how many batches were scored.
    `params`: the trained ones (a peft run's adapters: the task sees them on their frozen base)."""
    shardings = step.batch_shardings(setup.mesh, setup.task, microbatched=False)
    eval_step = lambda p, local: setup.eval_fn(p, sharding.global_batch(local, shardings), setup.frozen)  # noqa: E731
    return setup.task.evaluate(setup.data, peft.with_base(params, setup.frozen), eval_step, max_batches)


def evaluation(setup: Setup, params, step_done: int, writer: Writer | None = None) -> Evaluation:
    """An evaluation of the held-out split, logged to `writer` if given; at the last step also what the task
    reports at the end (finish), so that all of it is on disk before the last checkpoint commits and a run
    resumed from that checkpoint logs nothing twice."""
    sums, n_batches = evaluate(setup, params, setup.cfg.train.eval_batches)
    scores = {k: float(v) for k, v in setup.task.scalars(sums, "eval").items()}
    if setup.cfg.eval.tasks:
        scores.update(_benchmark_scalars(setup, params))
    result = Evaluation(step_done, sums, n_batches, scores)
    if step_done == setup.cfg.train.steps and is_main():  # the compressors run on process 0 only
        result.summary = setup.task.finish(setup.data, result)
    if writer is not None:
        writer.scalars(step_done, {**scores, **(result.summary.scalars if result.summary else {})})
    return result


def _benchmark_scalars(setup: Setup, params) -> dict[str, float]:
    """eval.tasks' in-context benchmarks on the model being trained, as tasks/<name>/<k>shot/<metric>."""
    from llm_jax import tasks
    from llm_jax.config import data_dir
    from llm_jax.evaluation import suite
    from llm_jax.inference.runner import ModelRunner, default_context
    cfg, e = setup.cfg, setup.cfg.eval
    params = tasks.exported_params(cfg, peft.with_base(params, setup.frozen))
    if setup.benchmark_runner is None:
        setup.benchmark_runner = ModelRunner(cfg.model, params, peft=cfg.peft)
    runner = setup.benchmark_runner
    runner.params = params
    results = suite.run(runner, setup.data.tokenizer, e.tasks, e.shots, data_dir(cfg), context=default_context(cfg),
                        limit=e.limit, seed=e.seed, batch_size=cfg.train.batch_size, max_gen_tokens=e.max_gen_tokens)
    return suite.scalars(results)


def _describe(setup: Setup) -> str:
    cfg, mesh = setup.cfg, setup.mesh
    shape = "×".join(f"{k}={v}" for k, v in mesh.shape.items())
    start = (f", resuming from step {setup.start_step}" if setup.start_step else
             ", restarting from step 0 (an earlier attempt stopped before its first checkpoint)"
             if setup.earlier_attempt else "")
    return (f"{cfg.name}: {setup.n_params / 1e6:.2f}M params, {jax.device_count()} × "
            f"{jax.devices()[0].device_kind} ({jax.process_count()} process), mesh {shape}, "
            f"{setup.task.step_shape()}, {setup.task.describe(setup.data)}{start}")


def _train_steps(setup: Setup, writer: Writer, references: ReferenceLines, mngr, watch: PreemptionWatch,
                 clock: Clock):
    cfg, state, task = setup.cfg, setup.state, setup.task
    source = task.train_source(setup.data, jax.process_index(), jax.process_count())
    if setup.start_step:
        how = checkpoint.restore_data(setup.run_dir, cfg, setup.start_step, source)
        if is_main():
            print(f"resumed from checkpoint step {setup.start_step} (data position: {how})", flush=True)
    meta = checkpoint.meta(cfg, setup.data.tokenizer_path)
    batch_shardings = step.batch_shardings(setup.mesh, task, microbatched=True)
    perf = metrics.PerfMeter(task.tokens_per_step, task.flops_per_token, cfg.train.peak_tflops, task.throughput)
    plan = _Plan(setup, clock)
    bar = tqdm(total=plan.total, initial=setup.start_step, disable=not is_main(), unit="step", dynamic_ncols=True)
    pending, last_eval, done = None, None, setup.start_step

    def log(state):
        _log_train(pending, perf, writer, bar, setup.cfg, task.progress)
        return plan.update(pending[0], bar, state)
    try:
        while done < plan.total:
            # (a rollout generates with the whole model: a peft run's adapters on their frozen base)
            whole = state.replace(params=peft.with_base(state.params, setup.frozen))
            batch = _shorten(source.next_batch(whole), done, cfg.train.seq_len_warmup_steps)
            batch = sharding.global_batch(batch, batch_shardings)
            made = source.scalars()  # what producing the batch measured (a rollout's rewards), logged at its step
            if made:
                writer.scalars(done + 1, made)
                perf.exclude(made.get("perf/rollout_s", 0.0))
            state, step_metrics = setup.train_fn(state, batch, setup.frozen)
            if pending is not None:
                state = log(state)
            pending, done = (done + 1, step_metrics), done + 1
            preempted = watch.requested()
            every, last = cfg.checkpoint.every, done == plan.total
            save_now = (every and done % every == 0) or last or preempted
            eval_now = done % cfg.train.eval_every == 0 or last
            if save_now or eval_now:  # see this step's metrics (and stop on a non-finite one) first
                state = log(state)
                pending = None
            if eval_now:  # before the save, so that the checkpoint carries its eval scores
                with clock.excluding("eval"):
                    last_eval = evaluation(setup, state.params, done, writer)
                writer.scalars(done, {"time/train_s": clock.train_s()})
                references.write(done)
                perf.t0 = None  # evaluation time is not step time
            if save_now:
                with clock.excluding("checkpoint"):
                    _save(mngr, state, source, {**meta, "time": clock.report()}, last_eval if eval_now else None,
                          writer, done)
                perf.t0 = None  # a save is not step time
            if preempted:
                mngr.wait_until_finished()
                raise Preempted(done, watch.signal_name or "a signal on another process")
        if pending is not None:
            state = log(state)
    finally:
        bar.close()
        source.close()  # grain worker processes and their shared memory
    return state, last_eval


def _shorten(batch, step_index: int, warmup_steps: int):
    """Step `step_index`'s batch in windows of a quarter, then half the length during seq_len warmup."""
    if step_index >= warmup_steps:
        return batch
    return batch.shorter(4 if step_index < warmup_steps // 2 else 2)


class _Plan:
    """The run's length: train.steps, or what a time budget plans (setup.cfg and the state then follow it)."""

    def __init__(self, setup: Setup, clock: Clock):
        self.setup, t = setup, setup.cfg.train
        # (the rate is measured from the step after the first of this attempt, which compiles)
        self.budget = Budget(t.time_budget_s, clock, max(t.seq_len_warmup_steps, setup.start_step) + 1,
                             planned=setup.planned_steps > 0) if t.time_budget_s else None
        self.total = setup.planned_steps or math.inf

    def update(self, step_done: int, bar, state):
        """After step `step_done` completed: the state, with a new plan if the budget makes one."""
        planned = self.budget and agree(self.budget.propose(step_done), jax.process_count())
        if not planned:
            return state
        self.budget.accept()
        self.total = planned
        self.setup.cfg = dataclasses.replace(self.setup.cfg, train=dataclasses.replace(self.setup.cfg.train,
                                                                                       steps=planned))
        bar.total = planned
        if is_main():
            print(f"time budget: {self.budget.clock.train_s():.1f} s of {self.budget.seconds:g} s used after step "
                  f"{step_done}; planned {planned} steps", flush=True)
        return with_planned_steps(state, planned)


def _save(mngr, state, source, meta: dict, evaluation: Evaluation | None, writer: Writer, done: int) -> None:
    writer.flush()  # points up to this step reach disk before the checkpoint can commit
    t0 = time.perf_counter()
    checkpoint.save(mngr, state, source, {**meta, "eval": evaluation.scores} if evaluation else meta)
    writer.scalars(done, {"perf/checkpoint_save_s": time.perf_counter() - t0})


def _log_train(pending, perf: metrics.PerfMeter, writer: Writer, bar, cfg: Config, progress: tuple[str, str]) -> None:
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
                     "tok_s": f"{perf.last.get(perf.throughput, float('nan')):,.0f}"}, refresh=False)


def _final_eval(setup: Setup, state, last_eval: Evaluation | None) -> dict:
    """The results of the run: the evaluation at its last step, with what the task adds to it. A run resumed
    from its last checkpoint evaluates again without logging: the killed attempt logged it before saving."""
    cfg = setup.cfg
    if last_eval is None or last_eval.step != cfg.train.steps:
        last_eval = evaluation(setup, state.params, cfg.train.steps)
    counts = {f"eval/{k}": last_eval.sums[k] for k in setup.task.counts}
    results = {**last_eval.scores, **counts, "params": setup.n_params, "steps": cfg.train.steps,
               "skipped_steps": int(jax.device_get(state.skipped))}
    if last_eval.summary:
        results.update(last_eval.summary.results)
        if last_eval.summary.text:
            print(last_eval.summary.text, flush=True)
    return results
