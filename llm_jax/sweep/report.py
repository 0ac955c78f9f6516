"""The report of a sweep: SWEEP_DIR/report.md, a table of every run and four plots (plots.py), from the runs'
TensorBoard event files, config.json and results.json (SWEEP_DIR/sweep.json, written by run.py, lists the
runs). The columns are the runs' task's summary scalars (Task.summary_scalars: bits per token and per byte
for language models, bits per pair and accuracy for reward models) and, where the runs logged it, training
seconds; the plots show its headline, the curves beside each run's reference lines (RUN_DIR/tb/NAME/: the
compressors on its held-out bytes).
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from llm_jax import tasks
from llm_jax.config import from_dict
from llm_jax.errors import ConfigError
from llm_jax.sweep import plots
from llm_jax.train.checkpoint import committed_steps

FINAL_FRACTION = 0.1  # the final train loss is the mean over this last fraction of the logged steps
TRAIN_TIME = "time/train_s"  # training seconds so far (evaluations and checkpoints excluded), at each evaluation


@dataclass
class RunSummary:
    name: str
    hparams: dict
    state: str  # finished | unfinished: ... | not started
    last_step: int
    params: int | None = None
    tokens: float = math.nan  # trained so far
    flops: float = math.nan  # training FLOPs so far
    scores: dict = field(default_factory=dict)  # column label -> the run's final value of that scalar
    headline: str = ""  # the label of the scalar the plots show
    tokens_per_sec: float = math.nan
    eval_curve: tuple = ()  # ((step, headline value), ...)
    references: dict = field(default_factory=dict)  # name -> its eval_curve (Task.reference_lines)
    time_curve: tuple = ()  # ((step, training seconds), ...)
    train_time_s: float = math.nan


def write_report(sweep_dir: Path) -> Path:
    """Writes SWEEP_DIR/report.md and its PNG plots; returns the Markdown file's path."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / "sweep.json").is_file():
        raise ConfigError(f"{sweep_dir} holds no sweep (no sweep.json): give the directory `llm-jax sweep` ran in")
    definition = json.loads((sweep_dir / "sweep.json").read_text())
    runs = [summarise_run(sweep_dir / r["name"], r["name"], r["hparams"]) for r in definition["runs"]]
    finished = [r for r in runs if r.state == "finished"]
    headline = next((r.headline for r in runs if r.headline), "")
    plots_ = [plots.plot_vs_swept(finished, definition["swept"], headline, sweep_dir / "eval_vs_swept.png"),
              plots.plot_vs_flops(finished, headline, sweep_dir / "eval_vs_flops.png"),
              plots.plot_curves(runs, headline, sweep_dir / "eval_curves.png"),
              plots.plot_vs_wall_clock(runs, headline, sweep_dir / "eval_vs_wall_clock.png")]
    path = sweep_dir / "report.md"
    path.write_text(_markdown(definition, runs, [p for p in plots_ if p]))
    return path


def summarise_run(run_dir: Path, name: str, hparams: dict) -> RunSummary:
    if not (run_dir / "config.json").exists():
        return RunSummary(name, hparams, "not started", 0)
    scalars = _scalars(run_dir / "tb")
    cfg = from_dict(json.loads((run_dir / "config.json").read_text()))
    task = tasks.make(cfg, check=False)  # the run's data may be gone
    (first_train, _), (headline_tag, headline) = task.summary_scalars[0], task.summary_scalars[-1]
    train = scalars.get(first_train, [])
    last_step = train[-1][0] if train else 0
    results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").exists() else None
    checkpoints = committed_steps(run_dir)
    state = "finished" if results else (f"unfinished: checkpoint at step {checkpoints[-1]} of {cfg.train.steps}"
                                        if checkpoints else "unfinished: no checkpoint")
    steps = results["steps"] if results else last_step
    tokens = float(steps * task.tokens_per_step)
    # Training scalars are noisy step to step: their final value is a mean; an evaluation's is its last.
    scores = {label: (_final_mean if tag.startswith("train/") else _last)(scalars.get(tag, []))
              for tag, label in task.summary_scalars}
    # eval.tasks' benchmarks (evaluation/suite.py): a column per benchmark and shot count, its last accuracy
    scores.update({tag.removeprefix("tasks/"): _last(points) for tag, points in sorted(scalars.items())
                   if tag.startswith("tasks/") and tag.endswith("/acc")})
    speeds = [v for _, v in scalars.get(task.throughput, [])]
    times = tuple(scalars.get(TRAIN_TIME, []))
    return RunSummary(name, hparams, state, last_step, results["params"] if results else None, tokens,
                      task.flops_per_token * tokens, scores, headline,
                      statistics.median(speeds) if speeds else math.nan, tuple(scalars.get(headline_tag, [])),
                      _references(run_dir / "tb", headline_tag), times,
                      (results or {}).get("train_time_s", _last(times)))


def _references(tb: Path, tag: str) -> dict[str, tuple]:
    """The `tag` curve of each sibling run of reference values, TB/NAME/, by NAME."""
    subdirs = sorted(p for p in tb.iterdir() if p.is_dir()) if tb.is_dir() else []
    return {sub.name: tuple(curve) for sub in subdirs if (curve := _scalars(sub).get(tag))}


def _scalars(tb: Path) -> dict[str, list[tuple[int, float]]]:
    if not tb.is_dir():
        return {}
    events = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _final_mean(points: list) -> float:
    if not points:
        return math.nan
    tail = points[-max(1, math.ceil(FINAL_FRACTION * len(points))):]
    return sum(v for _, v in tail) / len(tail)


def _last(points: list) -> float:
    return points[-1][1] if points else math.nan


# ---------------------------------------------------------------------------------------------- Markdown

NOTES = ("- training FLOPs = FLOPs per token × tokens trained, with FLOPs per token = 6·N + 6·n_layers·n_heads·"
         "head_dim·seq_len (forward and backward; N the matmul parameters; `llm_jax/model/flops.py`) and tokens "
         "trained = steps × batch_size × seq_len (a preference pair counts as two sequences).",
         f"- train columns: the mean over the last {FINAL_FRACTION:.0%} of the logged training steps; eval columns: "
         "the last evaluation, on the held-out split; tokens/s: the median over the run's logged windows.")
TIME_NOTE = "- train s: training wall-clock seconds, evaluations and checkpoints excluded."


def _markdown(definition: dict, runs: list[RunSummary], plots: list[Path]) -> str:
    common = definition["overrides"] + definition["extra_overrides"]
    labels = list(dict.fromkeys(label for r in runs for label in r.scores))
    timed = any(math.isfinite(r.train_time_s) for r in runs if r.state == "finished")
    columns = ("run", "params", "training FLOPs", "tokens", *labels, "tokens/s", *(("train s",) if timed else ()))
    lines = [f"# Sweep `{definition['name']}`", "",
             f"Base experiment `{definition['base']}`; swept: {', '.join(f'`{k}`' for k in definition['swept'])}; "
             f"every run also: {', '.join(f'`{o}`' for o in common) or 'nothing'}.", "",
             "| " + " | ".join(columns) + " |", "|---" + "|---:" * (len(columns) - 1) + "|"]
    lines += [f"| {r.name} | {r.params:,} | {r.flops:.3g} | {r.tokens:,.0f} | "
              + "".join(f"{r.scores.get(label, math.nan):.4f} | " for label in labels)
              + f"{r.tokens_per_sec:,.0f} |" + (f" {r.train_time_s:,.0f} |" if timed else "")
              for r in runs if r.state == "finished"]
    lines += ["", *NOTES, *([TIME_NOTE] if timed else [])]
    unfinished = [r for r in runs if r.state != "finished"]
    if unfinished:
        lines += ["", "Not finished:", "", "| run | status | last logged step |", "|---|---|---:|"]
        lines += [f"| {r.name} | {r.state} | {r.last_step} |" for r in unfinished]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"
