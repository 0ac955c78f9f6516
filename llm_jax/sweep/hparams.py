"""A sweep's TensorBoard HParams data: the experiment (swept keys, their values, the metrics) in an event
file of SWEEP_DIR, and each run's session start in RUN_DIR/tb, so that `tensorboard --logdir SWEEP_DIR`
shows the HParams dashboard next to the curves of every run.
"""
from __future__ import annotations

import time
from pathlib import Path

from tensorboard.compat.proto import event_pb2
from tensorboard.plugins.hparams import summary_v2 as hp

from llm_jax.sweep.plan import Run
from llm_jax.train.events import write_event_file

_SESSION_SUFFIX = ".sweep-hparams"  # names this sweep's own event files; Writer's resume cut keeps them (step 0)


def write_experiment(sweep_dir: Path, runs: list[Run]) -> None:
    """The HParams experiment (swept keys with their values, the metrics) in SWEEP_DIR's own event file,
    rewritten in place so a sweep given more points shows them."""
    hparams = []
    for key in runs[0].hparams:
        values = {r.hparams[key] for r in runs}  # of the config field's type, so one type
        hparams.append(hp.HParam(key, hp.Discrete(values) if len({type(v) for v in values}) == 1 else None))
    metrics = dict.fromkeys(tag for r in runs for tag in r.metrics)  # the task's; in order, once each
    summary = hp.hparams_config_pb(hparams, [hp.Metric(tag) for tag in metrics])
    _write_events(sweep_dir / f"events.out.tfevents.0{_SESSION_SUFFIX}", summary)


def write_session(run: Run) -> None:
    """The run's HParams session start in RUN_DIR/tb, once: at step 0 in a file of its own, which the
    training Writer's resume cut (summaries past the resume step) leaves alone."""
    tb = run.run_dir / "tb"
    if not any(tb.glob(f"events.out.tfevents.*{_SESSION_SUFFIX}")):
        tb.mkdir(parents=True, exist_ok=True)
        summary = hp.hparams_pb(run.hparams, trial_id=run.name)
        _write_events(tb / f"events.out.tfevents.{int(time.time())}{_SESSION_SUFFIX}", summary)


def _write_events(path: Path, summary) -> None:
    write_event_file(path, [event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString(),
                            event_pb2.Event(wall_time=time.time(), step=0, summary=summary).SerializeToString()])
