"""`llm-jax pipeline`: stages wired export to export, validated before anything runs, resumed after a kill
without redoing finished stages, and a report card at the end."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_MODEL, TINY_RUN
from llm_jax.cli.main import main
from llm_jax.errors import ConfigError
from llm_jax.pipeline.plan import Card, Comparisons, Pipeline, Stage, plan, with_overrides

ROOT = Path(__file__).resolve().parents[1]


def tiny_pipeline(corpus: Path, data: Path, card: Card = Card(tasks=())) -> Pipeline:
    """pretrain → sft → rm → ppo on the toy corpus and files of `data`, every stage seconds long."""
    pre = (f"data.sources=text:{corpus}/*.txt", *TINY_MODEL, *TINY_RUN, "train.steps=20", "train.eval_every=1000")
    return Pipeline(stages=(
        Stage("pretrain", "pretrain_tiny", pre),
        Stage("sft", "sft_tiny", (f"data.sources=chat:{data}/dialogues.jsonl", "train.steps=30",
                                  "train.eval_every=1000", "checkpoint.every=10"), init_from="pretrain"),
        Stage("rm", "rm_tiny", (f"data.sources=pairs:{data}/pairs.jsonl", "train.steps=10", "train.batch_size=8",
                                "train.eval_every=10"), init_from="sft"),
        Stage("ppo", "ppo_tiny", (f"data.sources=prompts:{data}/prompts.jsonl", "train.steps=8",
                                  "train.eval_every=8", "checkpoint.every=8"), init_from="sft", reward_model="rm"),
        Stage("dpo", "dpo_tiny", (f"data.sources=pairs:{data}/pairs.jsonl", "train.steps=4"), init_from="sft",
              enabled=False),
    ), card=card, name="tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline_data")
    qa = [("what is the capital of france?", "paris."), ("say hello", "hello to you!")]
    (root / "dialogues.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n" for q, a in qa * 20))
    (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"the cat {i}", "chosen": "the cat sees the dog.",
                                                          "rejected": "fish fish fish"}) + "\n" for i in range(40)))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"the dog {i}"}) + "\n" for i in range(40)))
    return root


def test_stages_are_wired_and_validated_before_anything_runs(corpus, data, tmp_path):
    items, held = plan(tiny_pipeline(corpus, data), tmp_path)
    assert [i.stage.name for i in items] == ["pretrain", "sft", "rm", "ppo"] and not held
    ppo = items[-1]
    assert f"checkpoint.init_from={tmp_path}/sft/export" in ppo.overrides
    assert f"rl.reward_model={tmp_path}/rm/export" in ppo.overrides
    assert ppo.cfg.model == items[1].cfg.model  # the SFT export's model, planned before it exists
    assert ppo.cfg.data.tokenizer == f"{tmp_path}/sft/export/tokenizer.model"

    base = tiny_pipeline(corpus, data)
    for overrides, message in [(["sft.train.stepz=3"], "stage sft: unknown config key 'train.stepz'"),
                               (["nope.train.steps=3"], "no stage 'nope'"),
                               (["card.limitt=3"], "Card has no settable field 'limitt'"),
                               (["rm.enabled=false"], "stage ppo: reward_model='rm' is not an earlier, enabled"),
                               (["dpo.enabled=true", "dpo.dpo.beta=-1"], "stage dpo: dpo.beta")]:
        with pytest.raises(ConfigError, match=message):
            plan(with_overrides(base, overrides), tmp_path)
    wrong = Pipeline(stages=(*base.stages[:3], Stage("ppo", "ppo_tiny", init_from="sft", reward_model="sft")))
    with pytest.raises(ConfigError, match="reward_model='sft' is a task=sft stage, not a reward model"):
        plan(wrong, tmp_path)
    assert not any(tmp_path.iterdir())  # planning writes nothing


def test_a_stage_waiting_for_user_data_holds_its_dependents_until_one_override_gives_it(corpus, data, tmp_path):
    base = tiny_pipeline(corpus, data)
    stages = [s if s.name != "rm" else Stage("rm", "rm_tiny", init_from="sft", waits_for="data.sources")
              for s in base.stages]
    waiting = Pipeline(stages=tuple(stages), name="zh-like")
    items, held = plan(waiting, tmp_path)
    assert [i.stage.name for i in items] == ["pretrain", "sft"]
    assert held == {"rm": "waits for --set rm.data.sources=...", "ppo": "waits for stage rm"}
    items, held = plan(with_overrides(waiting, [f"rm.data.sources=pairs:{data}/pairs.jsonl"]), tmp_path)
    assert [i.stage.name for i in items] == ["pretrain", "sft", "rm", "ppo"] and not held
    comparisons = Pipeline(stages=(*base.stages[:4], Comparisons("c2", "ppo", "sft", "rm", f"prompts:{data}/p.jsonl"),
                                   Stage("rm2", "rm_tiny", init_from="sft", pairs_from="c2")))
    rm2 = plan(comparisons, tmp_path)[0][-1]
    assert f"data.sources=pairs:{tmp_path}/c2/pairs.jsonl" in rm2.overrides


def test_explicit_settings_win_over_the_wiring_and_a_changed_stage_is_refused(corpus, data, tmp_path):
    from llm_jax.config import to_json
    from llm_jax.pipeline.run import check_unchanged
    base = tiny_pipeline(corpus, data)
    second = Pipeline(stages=(*base.stages[:4], Comparisons("c2", "ppo", "sft", "rm", f"prompts:{data}/p.jsonl",
                                                            enabled=False),
                              Stage("rm2", "rm_tiny", init_from="sft", pairs_from="c2")))
    with pytest.raises(ConfigError, match="pairs_from='c2' is not an earlier, enabled Comparisons stage"):
        plan(second, tmp_path)
    labels = with_overrides(second, [f"rm2.data.sources=pairs:{data}/pairs.jsonl"])  # people's labels instead
    rm2 = plan(labels, tmp_path)[0][-1]
    assert rm2.cfg.data.sources == (f"pairs:{data}/pairs.jsonl",)
    with pytest.raises(ConfigError, match="stage name 'sft' must be unique"):  # a disabled duplicate counts too
        plan(Pipeline(stages=(*base.stages, Stage("sft", "sft_tiny", enabled=False))), tmp_path)

    sft = plan(base, tmp_path)[0][1]
    sft.run_dir.mkdir(parents=True)
    (sft.run_dir / "config.json").write_text(to_json(sft.cfg))
    check_unchanged("tiny", sft)  # the same config: goes on
    changed = plan(with_overrides(base, ["sft.train.steps=31"]), tmp_path)[0][1]
    with pytest.raises(ConfigError, match="stage sft: .* trained with another config \\(train.steps: 30 saved"):
        check_unchanged("tiny", changed)


def test_dry_run_prints_every_command_and_writes_nothing(corpus, data, tmp_path, capsys):
    file = tmp_path / "tiny.py"
    file.write_text(pipeline_file(corpus, data))
    assert main(["pipeline", str(file), "--pipeline-dir", str(tmp_path / "runs"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dpo: off (--set dpo.enabled=true)" in out and out.count("llm_jax train --config") == 4
    assert f"--set rl.reward_model={tmp_path}/runs/rm/export" in out and not (tmp_path / "runs").exists()
    assert main(["pipeline", str(file), "--pipeline-dir", str(tmp_path / "runs"), "--dry-run", "--launcher", "slurm",
                 "--nodes", "2", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert out.count("#SBATCH --nodes=2") == 4 and out.count("llm_jax export --run-dir") == 4
    assert not (tmp_path / "runs").exists()


def pipeline_file(corpus: Path, data: Path) -> str:
    return (f"import sys\nsys.path.insert(0, {str(ROOT / 'tests')!r})\n"
            "from pathlib import Path\nfrom llm_jax.pipeline.plan import Card\nfrom test_pipeline import tiny_pipeline\n"
            f"def pipeline():\n    return tiny_pipeline(Path({str(corpus)!r}), Path({str(data)!r}), Card(tasks=(), "
            f"prompts=('what is the capital of france?',), max_tokens=8, judge='rm', baseline='sft', "
            f"compare_prompts='prompts:{data}/prompts.jsonl', compare_samples=4))\n")


@pytest.mark.slow
def test_a_pipeline_killed_in_its_middle_stage_finishes_on_rerun_without_redoing_stages(corpus, data, tmp_path):
    file, runs = tmp_path / "tiny.py", tmp_path / "runs"
    file.write_text(pipeline_file(corpus, data))
    argv = [sys.executable, "-m", "llm_jax", "pipeline", str(file), "--pipeline-dir", str(runs)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not (runs / "sft" / "config.json").exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # somewhere inside the SFT stage
    os.killpg(first.pid, signal.SIGKILL)  # the pipeline and its `train` at once, no chance to save
    first.wait()
    assert (runs / "pretrain" / "export" / "config.json").exists() and not (runs / "sft" / "export").exists()
    pretrain_export = (runs / "pretrain" / "export" / "config.json").stat().st_mtime_ns

    second = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "pretrain (pretrain_tiny (task pretrain)): finished" in second.stdout
    assert "=== pretrain" not in second.stdout and "=== sft" in second.stdout
    assert (runs / "pretrain" / "export" / "config.json").stat().st_mtime_ns == pretrain_export
    record = json.loads((runs / "pipeline.json").read_text())
    assert set(record["state"].values()) == {"finished"} and set(record["wall_s"]) == {"pretrain", "sft", "rm", "ppo"}
    report = (runs / "report.md").read_text()
    for stage in ("pretrain", "sft", "rm", "ppo"):
        assert stage in report
    assert "what is the capital of france?" in report

    third = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0 and "===" not in third.stdout  # nothing left to run
