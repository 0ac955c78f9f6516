"""`llm-jax eval-tasks` and `eval.tasks` in training: the table, the JSON, the written prompts, the config checks
and the TensorBoard scalars, on tiny benchmark folders (tests/test_benchmarks.py's) and a tiny model."""
import dataclasses
import json

import pytest

from llm_jax.cli.main import main
from llm_jax.config import Config, validate
from llm_jax.errors import ConfigError
from llm_jax.experiment import apply_overrides
from llm_jax.task_config import EvalConfig
from tests.test_benchmarks import write_benchmarks


@pytest.fixture
def root(tmp_path):
    return write_benchmarks(tmp_path / "shared")


@pytest.mark.slow
def test_eval_tasks_prints_a_table_writes_json_and_the_prompts(tiny_export, root, tmp_path, capsys):
    out, prompts = tmp_path / "scores.json", tmp_path / "prompts"
    assert main(["eval-tasks", "--checkpoint", str(tiny_export), "--tasks", "blimp,piqa,truthfulqa_mc,gsm8k",
                 "--shots", "0,1", "--limit", "3", "--data-dir", str(root), "--max-gen-tokens", "8",
                 "--json", str(out), "--write-prompts", str(prompts)]) == 0
    table = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert list(results["blimp"]) == ["0shot"]  # minimal pairs are zero-shot only
    for name in ("piqa", "truthfulqa_mc", "gsm8k"):
        assert list(results[name]) == ["0shot", "1shot"]
    for name, by_shot in results.items():
        for shot, r in by_shot.items():
            assert r["n"] == (2 if name == "truthfulqa_mc" else 3)  # the tiny TruthfulQA has 2 questions
            assert 0.0 <= r["acc"] <= 1.0 and r["stderr"] >= 0 and r["seconds"] > 0
            assert (tmp_path / "prompts" / f"{name}_{shot}.jsonl").is_file()
            assert f"{name:<15}{shot.removesuffix('shot'):>6}" in table
    assert results["piqa"]["0shot"]["chance"] == 0.5 and "acc_norm" in results["piqa"]["0shot"]
    written = [json.loads(line) for line in (prompts / "piqa_1shot.jsonl").read_text().splitlines()]
    assert len(written) == 3 and written[0]["context"].count("Question:") == 2


def test_eval_tasks_lists_and_refuses_in_one_line(root, capsys):
    assert main(["eval-tasks", "--tasks", "list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == ["blimp", "sling", "truthfulqa_mc", "gsm8k", "cmmlu", "piqa"]
    for flags, words in ((["--tasks", "mmlu"], "--tasks: mmlu unknown"), (["--tasks", "piqa", "--shots", "x"],
                                                                         "--shots='x'")):
        assert main(["eval-tasks", "--checkpoint", "unused", *flags]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1


def test_the_eval_section_is_checked_and_parsed():
    cfg = apply_overrides(Config(), ["eval.tasks=blimp,piqa", "eval.shots=0,5"])
    assert cfg.eval == EvalConfig(tasks=("blimp", "piqa"), shots=(0, 5)) and validate(cfg)
    for change, words in (({"tasks": ("mmlu",)}, "eval.tasks: mmlu unknown"),
                          ({"tasks": ("piqa",), "shots": (-1,)}, "eval.shots")):
        with pytest.raises(ConfigError, match=words):
            validate(dataclasses.replace(Config(), eval=EvalConfig(**change)))
    with pytest.raises(ConfigError, match="eval.tasks needs a language model; task=reward"):
        validate(dataclasses.replace(Config(), task="reward", eval=EvalConfig(tasks=("piqa",))))


@pytest.mark.slow
def test_training_logs_the_benchmarks_at_each_evaluation(train_args, root, tmp_path, scalars):
    run = tmp_path / "run"
    assert main(train_args(run, "train.steps=20", "train.eval_every=10", "eval.tasks=piqa,blimp",
                           "eval.shots=0,1", "eval.limit=4", f"data.data_dir={root}")) == 0
    logged, _ = scalars(run)
    for tag in ("tasks/piqa/0shot/acc", "tasks/piqa/1shot/acc", "tasks/piqa/1shot/acc_norm", "tasks/blimp/0shot/acc"):
        assert [step for step, _ in logged[tag]] == [10, 20], tag
    results = json.loads((run / "results.json").read_text())
    assert results["tasks/piqa/1shot/acc"] == logged["tasks/piqa/1shot/acc"][-1][1]
