"""The plots of a sweep's report (report.py): the final headline scalar against the swept key and against
training FLOPs, and every run's eval curve against steps and against training wall-clock seconds, each beside
the run's reference lines (Task.reference_lines: the compressors on its held-out bytes, dashed)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from llm_jax.evaluation.baselines import label

if TYPE_CHECKING:
    from llm_jax.sweep.report import RunSummary


def plot_vs_swept(runs: list[RunSummary], swept: list[str], headline: str, path: Path) -> Path | None:
    """The final headline scalar against the first swept key, one line per setting of the other swept keys."""
    if not runs or not swept:
        return None
    key, others = swept[0], swept[1:]
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    values = [r.hparams[key] for r in runs]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    positions = values if numeric else [sorted(set(map(str, values))).index(str(v)) for v in values]
    lines: dict[str, list] = {}
    for run, x in zip(runs, positions):
        label_ = ", ".join(f"{k}={run.hparams[k]}" for k in others)
        lines.setdefault(label_, []).append((x, run.scores[headline]))
    for label_, points in lines.items():
        ax.plot(*zip(*sorted(points)), marker="o", label=label_ or None)
    if numeric and min(values) > 0 and max(values) > 10 * min(values):
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(set(map(str, values)))), sorted(set(map(str, values))))
    if others:
        ax.legend(fontsize="small")
    ax.set(xlabel=key, ylabel=f"final {headline}", title=f"Final {headline}")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)
    return path


def plot_vs_flops(runs: list[RunSummary], headline: str, path: Path) -> Path | None:
    if not runs:
        return None
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot([r.flops for r in runs], [r.scores[headline] for r in runs], "o")
    for run in runs:
        ax.annotate(run.name, (run.flops, run.scores[headline]), fontsize="x-small",
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.margins(x=0.15)  # room for the labels of the outermost points
    ax.set(xlabel="training FLOPs", ylabel=f"final {headline}", title=f"Final {headline} vs compute")
    ax.grid(alpha=0.3, which="both")
    fig.savefig(path, dpi=120)
    return path


def plot_curves(runs: list[RunSummary], headline: str, path: Path) -> Path | None:
    return _plot_over(runs, lambda run: lambda step: step, "step", headline, path,
                      f"{headline[:1].upper()}{headline[1:]} during training")


def plot_vs_wall_clock(runs: list[RunSummary], headline: str, path: Path) -> Path | None:
    """Against the training seconds logged at the same steps; runs that logged none are left out."""
    return _plot_over(runs, lambda run: dict(run.time_curve).get, "training wall-clock seconds", headline, path,
                      f"{headline[:1].upper()}{headline[1:]} vs training time")


def _plot_over(runs: list[RunSummary], x_of, xlabel: str, headline: str, path: Path, title: str) -> Path | None:
    """Each run's eval curve and its reference lines (dashed, one colour and legend entry per reference), at
    x = x_of(run)(step) for the steps where that is not None."""
    curves = [(run, x_of(run)) for run in runs]
    curves = [(run, x, points) for run, x in curves if (points := _at(run.eval_curve, x))]
    if not curves:
        return None
    fig = Figure(figsize=(9, 4.5), layout="constrained")
    ax = fig.subplots()
    for run, _, points in curves:
        ax.plot(*zip(*points), marker=".", label=run.name)
    names = sorted({name for run, _, _ in curves for name in run.references})
    for k, name in enumerate(names):
        lines = [points for run, x, _ in curves if (points := _at(run.references.get(name, ()), x))]
        for i, points in enumerate(lines):
            ax.plot(*zip(*points), "--", color=f"C{(len(curves) + k) % 10}", alpha=0.7,
                    label=None if i else label(name))
    ax.set(xlabel=xlabel, ylabel=headline, title=title)
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the curves, not on them
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)
    return path


def _at(curve: tuple, x) -> list[tuple[float, float]]:
    """The (x(step), value) points of a curve of (step, value), where x(step) is not None."""
    return [(x(step), value) for step, value in curve if x(step) is not None]
