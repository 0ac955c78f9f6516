"""A pipeline's report card and Comparisons stages (llm_jax/pipeline/card.py): compare rows become exactly the
pairs a `pairs:` source reads; the card of a fake pipeline directory says what each stage measured and what is
missing; its evaluations are cached and redone only when their settings change or an export is newer."""
import json
import os
import re

import pytest

from llm_jax.config import Config, DataConfig, to_json
from llm_jax.data.chat.dialogue import Message
from llm_jax.data.chat.pairs import Pair, iter_pair_groups
from llm_jax.errors import DataError
from llm_jax.inference import compare as cmp
from llm_jax.pipeline import card
from llm_jax.pipeline.plan import Card, Comparisons, Pipeline, Planned, Stage
from llm_jax.train.events import Writer
from test_evaluate import random_export

ROW = {"prompt": "hi", "answer_policy": "a", "answer_baseline": "b", "reward_policy": 1.0, "reward_baseline": 0.5}
TURNS = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}, {"role": "user", "content": "s?"}]


def row(**changes):
    return {**ROW, **changes}


def test_a_row_gives_a_pair_with_the_higher_reward_answer_chosen_unless_nothing_separates_them():
    assert card.pair_of(row()) == {"prompt": "hi", "chosen": "a", "rejected": "b"}
    assert card.pair_of(row(reward_policy=-1.0)) == {"prompt": "hi", "chosen": "b", "rejected": "a"}
    assert card.pair_of(row(answer_baseline="a")) == "identical answers"
    assert card.pair_of(row(answer_policy="")) == "empty answer"
    assert card.pair_of(row(reward_baseline=1.0)) == "equal rewards"


def comparisons(tmp_path, monkeypatch, rows):
    """A Comparisons stage whose compare() returns `rows`; the calls it got."""
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        return {"win_rate": 0.5, "win_rate_ci": [0.0, 1.0], "reward_policy": 0.1, "reward_baseline": 0.2,
                "settings": {"split": kwargs["split"]}}, rows

    monkeypatch.setattr(card, "compare", fake)
    monkeypatch.setattr(card, "saved_config", lambda path: Config(data=DataConfig(data_dir=str(tmp_path / "data"))))
    stage = Comparisons("round2", policy="dpo", baseline="sft", judge="rm", prompts="hh:a.jsonl, pairs:b.jsonl",
                        samples=4, max_tokens=8)
    return Planned(stage, tmp_path / "round2", None, ()), calls


def test_comparisons_write_pairs_that_the_pairs_source_reads_back(tmp_path, monkeypatch):
    rows = [row(prompt="one"), row(prompt=TURNS, reward_policy=0.0), row(answer_baseline="a"), row(reward_policy=0.5)]
    item, calls = comparisons(tmp_path, monkeypatch, rows)
    card.write_comparisons(item)
    (args, kwargs), = calls
    assert args == (*(tmp_path / name / "export" for name in ("dpo", "sft", "rm")), ("hh:a.jsonl", "pairs:b.jsonl"),
                    tmp_path / "data")
    assert kwargs == {"samples": 4, "max_tokens": 8, "split": "train"}  # the held-out prompts stay for judging
    groups = [group for _, group in iter_pair_groups((f"pairs:{item.run_dir / 'pairs.jsonl'}",), tmp_path)]
    turns = tuple(Message(t["role"], t["content"]) for t in TURNS)
    assert groups == [[Pair((Message("user", "one"),), "a", "b")], [Pair(turns, "b", "a")]]
    counts = json.loads((item.run_dir / "comparisons.json").read_text())
    assert counts["prompts"] == 4 and counts["pairs"] == 2
    assert counts["skipped"] == {"identical answers": 1, "equal rewards": 1}
    assert counts["win_rate"] == 0.5 and counts["settings"]["split"] == "train"


def test_comparisons_without_a_pair_leave_the_stage_unfinished(tmp_path, monkeypatch):
    item, _ = comparisons(tmp_path, monkeypatch, [row(answer_baseline="a")] * 3)
    with pytest.raises(DataError, match=r"pipeline stage round2: none of 3 prompts gave a pair \(\{'identical "):
        card.write_comparisons(item)
    assert not (item.run_dir / "pairs.jsonl").exists() and (item.run_dir / "comparisons.json").exists()


def test_the_train_split_of_prompts_is_the_complement_of_the_held_out_one(tmp_path):
    records = [{"prompt": f"question {i}?", "chosen": "yes.", "rejected": "no."} for i in range(20)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    held_out = cmp.held_out_prompts(("pairs:p.jsonl",), tmp_path, 0.2, 100)
    train = cmp.held_out_prompts(("pairs:p.jsonl",), tmp_path, 0.2, 100, split="train")
    assert len(held_out) == 4 and len(train) == 16 and not set(train) & set(held_out)
    assert cmp.held_out_prompts(("pairs:p.jsonl",), tmp_path, 0.2, 3, split="train") == train[:3]


# --- the card --------------------------------------------------------------------------------------------

def fake_run(pipeline_dir, stage, task, results, scalars, exported=True):
    run = pipeline_dir / stage.name
    cfg = Config(task=task)
    writer = Writer(run / "tb", True)
    writer.scalars(10, scalars)
    writer.close()
    (run / "config.json").write_text(to_json(cfg))
    if exported:
        (run / "results.json").write_text(json.dumps({"params": 1234, "steps": 10, **results}))
        (run / "export").mkdir()
        (run / "export" / "config.json").write_text(to_json(cfg))
    return Planned(stage, run, cfg, ())


@pytest.fixture
def pipeline_dir(tmp_path, monkeypatch):
    """(pipeline, items, directory, record, calls): pretrain -> sft -> rm, dpo; ppo from sft not finished; the
    evaluations faked, counted in calls."""
    stages = (Stage("pretrain", "p"), Stage("sft", "s", init_from="pretrain"), Stage("rm", "r", init_from="sft"),
              Stage("dpo", "d", init_from="sft"), Stage("ppo", "o", init_from="sft", reward_model="rm"))
    lm = {"eval/bits_per_byte": 1.5, "eval/bits_per_token": 5.0}
    items = [fake_run(tmp_path, stages[0], "pretrain", {**lm, "baselines_bits_per_byte": {"xz": 2.5, "xz_primed": 2.0}},
                      lm),
             fake_run(tmp_path, stages[1], "sft", lm, lm),
             fake_run(tmp_path, stages[2], "reward", {}, {"eval/accuracy": 0.625}),
             fake_run(tmp_path, stages[3], "dpo", {}, {"eval/kl_to_reference": 0.25}),
             fake_run(tmp_path, stages[4], "rl", {}, {}, exported=False)]
    calls = []
    bench = {"piqa": {"0shot": {"acc": 0.5625, "stderr": 0.05, "n": 16, "chance": 0.5, "skipped": 0}}}
    monkeypatch.setattr(card, "_load", lambda export: calls.append(("load", export.parent.name)))
    monkeypatch.setattr(card, "_benchmarks", lambda loaded, c, root: calls.append("benchmarks") or bench)
    monkeypatch.setattr(card, "_answers", lambda loaded, c, export: calls.append("answers") or ["a | b\nc"])

    def compare(policy, baseline, judge, sources, root, **kwargs):
        calls.append(("compare", policy.parent.name, baseline.parent.name, judge.parent.name))
        return {"n": 8, "win_rate": 0.75, "win_rate_ci": [0.5, 1.0], "reward_policy": 0.5, "reward_baseline": -0.25,
                "kl_nats_per_token": 0.125, "kl_nats_per_answer": 2.0, "length_policy": 9.0,
                "length_baseline": 12.0}, []

    monkeypatch.setattr(card, "compare", compare)
    pipeline = Pipeline(stages, Card(prompts=("Why?",), judge="rm", baseline="sft", compare_samples=8), "demo")
    return pipeline, items, tmp_path, {"wall_s": {"pretrain": 100.0, "sft": 10.0}}, calls


def test_the_card_reports_every_stage_and_says_what_is_missing(pipeline_dir):
    pipeline, items, path, record, calls = pipeline_dir
    report = card.write_card(pipeline, items, path, record)
    text = report.read_text()
    assert text.startswith("# Pipeline `demo`: pretrain → sft → rm → dpo → ppo; wall time 110 s (recorded for 2 of 5")
    assert "| rm | finished | 1,234 | - | not recorded | eval accuracy 0.625 |" in text
    assert "| ppo | new | - | - | not recorded | none logged |" in text  # started: no checkpoint yet
    assert "| model `pretrain` | 1.5000 |" in text and "| xz -9e primed | 2.0000 |" in text
    assert "| piqa 0-shot |" in text and "| sft | 0.562 ± 0.050 (n=16) |" in text and "| chance | 0.500 |" in text
    assert "| ppo | not run: stage ppo not finished |" in text
    assert "| dpo | 8 | 75.0% [50.0%, 100.0%] | +0.500 | -0.250 | 0.1250 | 2.000 | 9.0 / 12.0 |" in text
    assert "| sft | a \\| b<br>c |" in text  # one table cell
    assert "| rm |" not in text.split("## Win rate")[1]  # a reward model answers nothing
    for name in ("compression", "benchmarks", "wall_time"):
        assert (path / f"card_{name}.png").stat().st_size > 0 and f"(card_{name}.png)" in text
    lm = ["pretrain", "sft", "dpo"]
    assert sorted(c for c in calls if isinstance(c, str)) == ["answers"] * 3 + ["benchmarks"] * 3
    assert [c for c in calls if c[0] == "compare"] == [("compare", "dpo", "sft", "rm")]  # sft is the baseline
    assert [c[1] for c in calls if c[0] == "load"] == lm


def test_the_evaluations_are_cached_until_their_settings_change_or_an_export_is_newer(pipeline_dir):
    pipeline, items, path, record, calls = pipeline_dir
    card.write_card(pipeline, items, path, record)

    def report():  # less the card's own time (how long this write took: 0 s or 1 s as the clock rounds)
        text, n = re.subn(r"this card's evaluations .*? \(cached", "", path.joinpath("report.md").read_text())
        assert n == 1
        return text
    first = report()
    calls.clear()
    card.write_card(pipeline, items, path, record)
    assert not calls and report() == first
    now = path.joinpath("report.md").stat().st_mtime
    for file in [*path.glob("card/*/*.json"), *path.glob("*/export/config.json")]:
        os.utime(file, (now - 100,) * 2 if file.name == "config.json" else (now - 50,) * 2)
    os.utime(items[1].export / "config.json", (now - 10,) * 2)  # sft exported again, after the cached evaluations
    card.write_card(pipeline, items, path, record)
    assert sorted(map(str, calls)) == sorted(map(str, ["answers", "benchmarks", ("load", "sft"),
                                                       ("compare", "dpo", "sft", "rm")]))
    calls.clear()
    other = Pipeline(pipeline.stages, Card(prompts=("Why?",), judge="", baseline="sft", limit=5), "demo")
    text = card.write_card(other, items, path, record).read_text()
    assert calls.count("benchmarks") == 3 and "answers" not in calls  # only the benchmarks' settings changed
    assert "Not run: card.judge is empty" in text


def test_an_evaluation_that_refuses_its_input_is_reported_and_tried_again(pipeline_dir, monkeypatch):
    pipeline, items, path, record, calls = pipeline_dir

    def refuse(loaded, c, root):
        calls.append("refused")
        raise DataError("eval_piqa: no such folder")

    monkeypatch.setattr(card, "_benchmarks", refuse)
    text = card.write_card(pipeline, items, path, record).read_text()
    assert "- sft: not run: eval_piqa: no such folder" in text and not (path / "card_benchmarks.png").exists()
    card.write_card(pipeline, items, path, record)
    assert calls.count("refused") == 6  # nothing cached


@pytest.mark.slow
def test_answers_are_greedy_one_turn_chats_of_the_export(tmp_path_factory):
    from llm_jax.inference.runner import ModelRunner
    export = random_export(tmp_path_factory)[0]
    loaded = ModelRunner.load(export)
    answers = card._answers(loaded, Card(prompts=("the dog?", "the cat likes"), max_tokens=5), export)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert card._answers(loaded, Card(prompts=("the dog?", "the cat likes"), max_tokens=5), export) == answers
