"""A pipeline's report card (PIPELINE_DIR/report.md, card_report.py) and its Comparisons stages' pairs.

Per stage the card shows the run's own results (sweep/report.summarise_run: the task's summary scalars, the
compressors beside a pretraining run) and the wall time run.py recorded; for every language-model stage's
export, in-context benchmarks (evaluation/suite.py) and greedy answers to the card's prompts; and for every
stage initialised (directly or through a chain of init_from) from card.baseline, its win rate against the
baseline judged by card.judge (inference/compare.py, held-out prompts). These evaluations are cached as JSON in
PIPELINE_DIR/card/<stage>/, with the settings they were made with: a later card reuses one unless its settings
changed or an export it read is newer. What is missing (a stage not finished, a benchmark's data) is said in
the card instead of failing it.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from llm_jax.atomic import write_atomic
from llm_jax.config import data_dir
from llm_jax.data.chat.dialogue import Message
from llm_jax.data.chat.template import render_prompt, stop_ids
from llm_jax.errors import DataError, UserError
from llm_jax.evaluation import suite
from llm_jax.inference.compare import compare, fit_prompt, parse_sources, write_answers
from llm_jax.inference.runner import ModelRunner, default_context
from llm_jax.inference.stream import answer_text
from llm_jax.pipeline.plan import Card, Comparisons, Pipeline, Planned, head
from llm_jax.pipeline.run import stage_state
from llm_jax.train.export import saved_config

if TYPE_CHECKING:
    from llm_jax.sweep.report import RunSummary


# --- Comparisons stages ----------------------------------------------------------------------------------

def pair_of(row: dict) -> dict | str:
    """The preference pair of one compare row, {prompt, chosen: the higher-reward answer, rejected} as the
    `pairs:` source reads it, or why the row gives none (the reasons pairs.py would skip it for, and a tie)."""
    policy, baseline = row["answer_policy"], row["answer_baseline"]
    if not policy or not baseline:
        return "empty answer"
    if policy == baseline:
        return "identical answers"
    if row["reward_policy"] == row["reward_baseline"]:
        return "equal rewards"
    chosen, rejected = (policy, baseline) if row["reward_policy"] > row["reward_baseline"] else (baseline, policy)
    return {"prompt": row["prompt"], "chosen": chosen, "rejected": rejected}


def write_comparisons(item: Planned) -> None:
    """RUN_DIR/pairs.jsonl of a Comparisons stage, from the policy's and the baseline's answers to the first
    `samples` training prompts (the held-out ones stay for judging), and comparisons.json, its counts."""
    stage: Comparisons = item.stage
    policy, baseline, judge = (item.run_dir.parent / name / "export" for name in
                               (stage.policy, stage.baseline, stage.judge))
    try:
        summary, rows = compare(policy, baseline, judge, parse_sources(stage.prompts),
                                data_dir(saved_config(policy)), samples=stage.samples, max_tokens=stage.max_tokens,
                                split="train")
    except UserError as e:
        raise type(e)(f"pipeline stage {stage.name}: {e}") from None
    decisions = [pair_of(row) for row in rows]
    pairs = [d for d in decisions if isinstance(d, dict)]
    skipped = collections.Counter(d for d in decisions if isinstance(d, str))
    counts = {"prompts": len(rows), "pairs": len(pairs), "skipped": dict(skipped),
              **{k: summary[k] for k in ("win_rate", "win_rate_ci", "reward_policy", "reward_baseline")},
              "settings": summary["settings"]}
    item.run_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(item.run_dir / "comparisons.json", json.dumps(counts, indent=2) + "\n")
    if not pairs:
        raise DataError(f"pipeline stage {stage.name}: none of {len(rows)} prompts gave a pair ({dict(skipped)}); "
                        f"see {item.run_dir / 'comparisons.json'}")
    write_atomic(item.run_dir / "pairs.jsonl", "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))


# --- what the card knows of each stage -------------------------------------------------------------------

@dataclasses.dataclass
class StageFacts:
    item: Planned
    state: str  # run.stage_state
    wall_s: float | None  # pipeline.json's, None when not recorded
    summary: RunSummary | None = None  # the run's own results (training stages)
    results: dict = dataclasses.field(default_factory=dict)  # results.json, when the run wrote it
    comparisons: dict | None = None  # comparisons.json (Comparisons stages)
    benchmarks: dict | str | None = None  # suite.run's results, why there are none, None: not a language model
    answers: list | str | None = None  # one answer per card prompt, why none, None: not a language model
    win_rate: dict | str | None = None  # compare's summary against card.baseline, why none, None: not judged

    @property
    def name(self) -> str:
        return self.item.stage.name

    @property
    def baselines(self) -> dict:
        """The compressors' bits per byte on the run's held-out text (a pretraining run's results)."""
        return self.results.get("baselines_bits_per_byte", {})


def facts_of(item: Planned, record: dict) -> StageFacts:
    from llm_jax.sweep.report import summarise_run  # TensorBoard's reader: only when a card is made
    facts = StageFacts(item, stage_state(item), record.get("wall_s", {}).get(item.stage.name))
    if isinstance(item.stage, Comparisons):
        path = item.run_dir / "comparisons.json"
        facts.comparisons = json.loads(path.read_text()) if path.exists() else None
        return facts
    facts.summary = summarise_run(item.run_dir, item.stage.name, {})
    results = item.run_dir / "results.json"
    facts.results = json.loads(results.read_text()) if results.exists() else {}
    return facts


def write_card(pipeline: Pipeline, items: list[Planned], pipeline_dir: Path, record: dict,
               held: dict[str, str] | None = None) -> Path:
    """PIPELINE_DIR/report.md and its card_*.png beside it (card_report.py); returns the report's path."""
    from llm_jax.pipeline import card_report  # matplotlib: only when a card is made
    pipeline_dir = Path(pipeline_dir)
    facts = [facts_of(item, record) for item in items]
    start = time.perf_counter()
    evaluate_all(facts, pipeline.card, pipeline_dir / "card")
    path = pipeline_dir / "report.md"
    write_atomic(path, card_report.markdown(pipeline, facts, card_report.plots(facts, pipeline_dir), held or {},
                                            time.perf_counter() - start))
    return path


# --- evaluations of the exports, cached ------------------------------------------------------------------

def evaluate_all(facts: list[StageFacts], card: Card, cache: Path) -> None:
    """Fills in benchmarks and answers of every language-model stage, and the win rates against card.baseline."""
    load = functools.lru_cache(maxsize=1)(_load)  # one model in memory at a time, loaded only when needed
    lm = [f for f in facts if f.item.cfg is not None and head(f.item) == "lm"]
    for f in lm:
        root, export = data_dir(f.item.cfg), f.item.export
        settings = {"tasks": card.tasks, "shots": card.shots, "limit": card.limit, "data_dir": str(root)}
        f.benchmarks = (_evaluation(cache / f.name / "benchmarks.json", settings, [f],
                                    lambda: _benchmarks(load(export), card, root)) if card.tasks else {})
        f.answers = _evaluation(cache / f.name / "answers.json", {"prompts": card.prompts,
                                "max_tokens": card.max_tokens}, [f], lambda: _answers(load(export), card, export))
    load.cache_clear()  # compare loads its own models
    by_name = {f.name: f for f in facts}
    if card.judge in by_name and card.baseline in by_name:  # (a held judge: no win rates, as the card says)
        for f in lm:
            if f.name != card.baseline and descends(by_name, f.item, card.baseline):
                f.win_rate = _judged(f, by_name[card.baseline], by_name[card.judge], card, cache)


def descends(by_name: dict[str, StageFacts], item: Planned, ancestor: str) -> bool:
    """Whether `item` starts from `ancestor`'s export, directly or through a chain of init_from."""
    name = getattr(item.stage, "init_from", "")
    while name and name != ancestor:
        name = by_name[name].item.stage.init_from
    return bool(ancestor) and name == ancestor


def _judged(f: StageFacts, baseline: StageFacts, judge: StageFacts, card: Card, cache: Path) -> dict | str:
    """compare's summary of the stage against the baseline; its answers go to CACHE/<stage>/win_rate_answers.jsonl."""
    root = data_dir(judge.item.cfg)
    # No prompts named: the held-out prompts of the judge's own comparisons (the Chinese pipeline's user pairs).
    sources = parse_sources(card.compare_prompts) if card.compare_prompts else judge.item.cfg.data.sources
    settings = {"baseline": baseline.name, "judge": judge.name, "prompts": list(sources),
                "samples": card.compare_samples, "max_tokens": card.max_tokens, "data_dir": str(root)}

    def run() -> dict:
        summary, rows = compare(f.item.export, baseline.item.export, judge.item.export, sources, root,
                                samples=card.compare_samples,
                                max_tokens=card.max_tokens)
        (cache / f.name).mkdir(parents=True, exist_ok=True)
        write_answers(cache / f.name / "win_rate_answers.jsonl", rows)
        return summary
    return _evaluation(cache / f.name / "win_rate.json", settings, [f, baseline, judge], run)


def _evaluation(path: Path, settings: dict, stages: list[StageFacts], compute: Callable) -> dict | list | str:
    """compute()'s result, cached at `path` with its settings (redone when they differ or an export of `stages`
    is newer); why it is not run when a stage is unfinished or the evaluation refuses its input (a UserError:
    missing benchmark data, a prompt too long)."""
    unfinished = [g.name for g in stages if g.state != "finished"]
    if unfinished:
        return f"not run: stage {', '.join(unfinished)} not finished"
    settings = json.loads(json.dumps(settings))  # as the cache file holds them: lists, not tuples
    if path.exists():
        held = json.loads(path.read_text())
        newest = max((g.item.export / "config.json").stat().st_mtime for g in stages)
        if held["settings"] == settings and newest <= path.stat().st_mtime:
            return held["result"]
    try:
        result = compute()
    except UserError as e:
        return f"not run: {e}"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"settings": settings, "result": result}, indent=2) + "\n")
    return result


def _load(export: Path):
    return ModelRunner.load(export)


def _benchmarks(loaded, card: Card, root: Path) -> dict:
    cfg, runner, tokenizer = loaded
    return suite.run(runner, tokenizer, tuple(card.tasks), tuple(card.shots), root, context=default_context(cfg),
                     limit=card.limit)


def _answers(loaded, card: Card, export: Path) -> list[str]:
    """Greedy answers to card.prompts, each a one-turn chat in the export's chat template."""
    cfg, runner, tokenizer = loaded
    if not card.prompts:
        return []
    template = cfg.data.chat_template
    stops = sorted(stop_ids(tokenizer, template))
    prompts = [fit_prompt(render_prompt([Message("user", p)], tokenizer, template), default_context(cfg),
                          card.max_tokens, export).tolist() for p in card.prompts]
    answers = runner.greedy.generate(prompts, card.max_tokens, stop_ids=stops, pad_id=tokenizer.pad_id)
    return [answer_text(tokenizer, a, stops) for a in answers]
