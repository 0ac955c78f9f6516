"""The Markdown and PNGs of a pipeline's report card, from what card.py gathered (StageFacts)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from llm_jax.evaluation.baselines import label
from llm_jax.pipeline.plan import Pipeline, describe
from llm_jax.sweep.report import FINAL_FRACTION

if TYPE_CHECKING:
    from llm_jax.pipeline.card import StageFacts


def markdown(pipeline: Pipeline, facts: list[StageFacts], plots: list[Path], held: dict[str, str],
             card_s: float = math.nan) -> str:
    walls = [f.wall_s for f in facts if f.wall_s is not None]
    lines = [f"# Pipeline `{pipeline.name}`: {' → '.join(f.name for f in facts)}; wall time {_seconds(sum(walls))}"
             + ("" if len(walls) == len(facts) else f" (recorded for {len(walls)} of {len(facts)} stages)")
             + ("" if math.isnan(card_s) else f", then this card's evaluations {_seconds(card_s)} (cached ones "
                "are not redone)"), ""]
    lines += [f"- `{f.name}` ({describe(f.item)}): {f.state}, in `{f.item.run_dir}`" for f in facts]
    lines += [f"- `{name}`: held, {why}" for name, why in held.items()]
    for section in (_stages, _compression, _benchmarks, _win_rates, _answers):
        lines += ["", *section(pipeline, facts)]
    lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _stages(pipeline: Pipeline, facts: list[StageFacts]) -> list[str]:
    lines = ["## Stages", "", "The runs' own results: eval …, the last evaluation (held-out split); train …, the "
             f"mean over the last {FINAL_FRACTION:.0%} of the logged training steps.", "",
             "| stage | state | params | train s | wall s | results |", "|---|---|---:|---:|---:|---|"]
    for f in facts:
        s = f.summary
        wall = _seconds(f.wall_s) if f.wall_s is not None else "not recorded"
        if s is None:
            lines.append(f"| {f.name} | {f.state} | | | {wall} | {_comparisons(f.comparisons)} |")
            continue
        figures = "<br>".join(f"{k} {v:.4g}" for k, v in s.scores.items() if math.isfinite(v)) or "none logged"
        train_s = _seconds(s.train_time_s) if math.isfinite(s.train_time_s) else "-"
        params = f"{s.params:,}" if s.params else "-"
        lines.append(f"| {f.name} | {f.state} | {params} | {train_s} | {wall} | {figures} |")
    return lines


def _comparisons(c: dict | None) -> str:
    if c is None:
        return "not finished"
    lo, hi = c["win_rate_ci"]
    skipped = ", ".join(f"{n} {why}" for why, n in c["skipped"].items()) or "none"
    return (f"{c['pairs']} pairs from {c['prompts']} training prompts (skipped: {skipped})<br>policy win rate "
            f"{c['win_rate']:.1%} [{lo:.1%}, {hi:.1%}], rewards {c['reward_policy']:+.3f} vs "
            f"{c['reward_baseline']:+.3f}")


def _compression(pipeline: Pipeline, facts: list[StageFacts]) -> list[str]:
    lines = ["## Compression", ""]
    shown = [f for f in facts if f.baselines]
    if not shown:
        return lines + ["No stage measured the compressors (a pretraining stage's results.json holds them)."]
    for f in shown:
        bpb = f.results.get("eval/bits_per_byte", math.nan)
        lines += [f"Held-out text of `{f.name}`, bits per byte (primed: the compressor read the training text first, "
                  "as the model did):", "", "| | bits/byte |", "|---|---:|", f"| model `{f.name}` | {bpb:.4f} |"]
        lines += [f"| {label(name)} | {v:.4f} |" for name, v in f.baselines.items()] + [""]
    return lines[:-1]


def _benchmarks(pipeline: Pipeline, facts: list[StageFacts]) -> list[str]:
    card = pipeline.card
    lines = ["## In-context benchmarks", ""]
    scored = [f for f in facts if f.benchmarks is not None]
    columns = _columns(scored)
    if not card.tasks or not scored:
        return lines + [f"Not run: {'card.tasks is empty' if scored else 'no language-model stage'}."]
    lines += [f"Accuracy ± standard error (n items; skipped: a choice longer than the context; exemplars cut: "
              f"prompts whose exemplars were cut to fit it), first {card.limit or 'all'} items of each, "
              f"{', '.join(map(str, card.shots))} shots (minimal-pair benchmarks: 0 only).", ""]
    if not columns:
        return lines + [f"- {f.name}: {f.benchmarks}" for f in scored]
    lines += ["| stage | " + " | ".join(f"{t} {k}-shot" for t, k in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for f in scored:
        if isinstance(f.benchmarks, str):
            lines.append(f"| {f.name} | {f.benchmarks} |" + " |" * (len(columns) - 1))
            continue
        cells = [_acc(f.benchmarks.get(t, {}).get(f"{k}shot")) for t, k in columns]
        lines.append(f"| {f.name} | " + " | ".join(cells) + " |")
    chance = [next((f.benchmarks[t][f"{k}shot"]["chance"] for f in scored if not isinstance(f.benchmarks, str)
                    and f"{k}shot" in f.benchmarks.get(t, {})), math.nan) for t, k in columns]
    return lines + ["| chance | " + " | ".join(f"{c:.3f}" for c in chance) + " |"]


def _columns(scored: list[StageFacts]) -> list[tuple[str, int]]:
    found = {(t, int(shot.removesuffix("shot"))) for f in scored if isinstance(f.benchmarks, dict)
             for t, by_shot in f.benchmarks.items() for shot in by_shot}
    return sorted(found, key=lambda c: (c[0], c[1]))


def _acc(r: dict | None) -> str:
    if r is None:
        return "not run"
    notes = [f"{r[key]} {what}" for key, what in (("skipped", "skipped"), ("truncated", "exemplars cut"))
             if r.get(key)]
    return f"{r['acc']:.3f} ± {r['stderr']:.3f} (n={', '.join([str(r['n']), *notes])})"


def _win_rates(pipeline: Pipeline, facts: list[StageFacts]) -> list[str]:
    card = pipeline.card
    lines = ["## Win rate against the baseline", ""]
    if not card.baseline or not card.judge:
        return lines + [f"Not run: card.{'baseline' if not card.baseline else 'judge'} is empty (set both to compare "
                        "every policy started from the baseline with it, judged by a reward-model stage)."]
    judged = [f for f in facts if f.win_rate is not None]
    names = {f.name for f in facts}
    if not {card.baseline, card.judge} <= names:
        return lines + [f"Not run: `{card.judge if card.judge not in names else card.baseline}` is held or off."]
    if not judged:
        return lines + [f"Not run: no language-model stage starts from `{card.baseline}`."]
    prompts = f"`{card.compare_prompts}`" if card.compare_prompts else f"`{card.judge}`'s own pairs"
    lines += [f"Each policy and `{card.baseline}` answer the first {card.compare_samples} held-out prompts of "
              f"{prompts} (temperature 1, at most {card.max_tokens} tokens); `{card.judge}` scores "
              "both answers (normalised rewards); a tie counts half; 95% bootstrap interval over prompts; "
              "KL(policy‖baseline) on the policy's answers.", "",
              "| policy | n | win rate [95% CI] | reward policy | reward baseline | KL nats/token | KL nats/answer "
              "| length policy / baseline |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    for f in judged:
        w = f.win_rate
        if isinstance(w, str):
            lines.append(f"| {f.name} | {w} |" + " |" * 6)
            continue
        lo, hi = w["win_rate_ci"]
        lines.append(f"| {f.name} | {w['n']} | {w['win_rate']:.1%} [{lo:.1%}, {hi:.1%}] | {w['reward_policy']:+.3f} | "
                     f"{w['reward_baseline']:+.3f} | {w['kl_nats_per_token']:.4f} | {w['kl_nats_per_answer']:.3f} | "
                     f"{w['length_policy']:.1f} / {w['length_baseline']:.1f} |")
    return lines


def _answers(pipeline: Pipeline, facts: list[StageFacts]) -> list[str]:
    card = pipeline.card
    lines = ["## Answers", "", f"Greedy, at most {card.max_tokens} tokens, each prompt a one-turn chat in the "
             "stage's chat template."]
    answering = [f for f in facts if f.answers is not None]
    if not card.prompts or not answering:
        return lines + ["", f"Not run: {'card.prompts is empty' if answering else 'no language-model stage'}."]
    for i, prompt in enumerate(card.prompts):
        lines += ["", f"**{escape(prompt)}**", "", "| stage | answer |", "|---|---|"]
        lines += [f"| {f.name} | {f.answers if isinstance(f.answers, str) else escape(f.answers[i]) or '(empty)'} |"
                  for f in answering]
    return lines


def escape(text: str) -> str:
    """Text for one Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;").replace("\n", "<br>")


def _seconds(s: float) -> str:
    return f"{s:,.0f} s" if s < 120 else f"{s:,.0f} s ({s / 60:.1f} min)"


# --- plots -----------------------------------------------------------------------------------------------

def plots(facts: list[StageFacts], out: Path) -> list[Path]:
    made = [_compression_plot(facts, out / "card_compression.png"),
            _benchmark_plot(facts, out / "card_benchmarks.png"), _wall_plot(facts, out / "card_wall_time.png")]
    return [p for p in made if p is not None]


def _compression_plot(facts: list[StageFacts], path: Path) -> Path | None:
    shown = [f for f in facts if f.baselines]
    if not shown:
        return None
    fig = Figure(figsize=(4 + 3 * len(shown), 4), layout="constrained")
    for ax, f in zip(fig.subplots(1, len(shown), squeeze=False)[0], shown):
        names = [f"model {f.name}", *map(label, f.baselines)]
        values = [f.results.get("eval/bits_per_byte", math.nan), *f.baselines.values()]
        ax.bar(names, values, color=["C0"] + ["C7"] * len(f.baselines))
        ax.set(ylabel="bits per byte (held-out text)", title=f"{f.name}: model vs compressors")
        ax.tick_params(axis="x", labelrotation=30, labelsize="small")
        ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=120)
    return path


def _benchmark_plot(facts: list[StageFacts], path: Path) -> Path | None:
    scored = [f for f in facts if isinstance(f.benchmarks, dict)]
    columns = _columns(scored)
    if not columns:
        return None
    fig = Figure(figsize=(max(6, 1.2 * len(columns) * max(1, len(scored)) ** 0.5 + 2), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(scored)
    for i, f in enumerate(scored):
        results = [f.benchmarks.get(t, {}).get(f"{k}shot") for t, k in columns]
        ax.bar([c - 0.4 + width * (i + 0.5) for c in range(len(columns))],
               [r["acc"] if r else math.nan for r in results], width,
               yerr=[r["stderr"] if r else 0 for r in results], label=f.name, capsize=2)
    for c, (t, k) in enumerate(columns):
        chance = next(f.benchmarks[t][f"{k}shot"]["chance"] for f in scored if f"{k}shot" in f.benchmarks.get(t, {}))
        ax.hlines(chance, c - 0.45, c + 0.45, colors="black", linestyles="dashed", label="chance" if c == 0 else None)
    ax.set_xticks(range(len(columns)), [f"{t}\n{k}-shot" for t, k in columns])
    ax.set(ylabel="accuracy", title="In-context benchmarks (± standard error)", ylim=(0, 1))
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=120)
    return path


def _wall_plot(facts: list[StageFacts], path: Path) -> Path | None:
    timed = [f for f in facts if f.wall_s is not None]
    if not timed:
        return None
    fig = Figure(figsize=(6, 1 + 0.4 * len(timed)), layout="constrained")
    ax = fig.subplots()
    ax.barh([f.name for f in timed][::-1], [f.wall_s for f in timed][::-1])
    ax.set(xlabel="wall-clock seconds", title="Wall time per stage")
    ax.grid(alpha=0.3, axis="x")
    fig.savefig(path, dpi=120)
    return path
