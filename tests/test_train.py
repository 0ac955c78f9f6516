"""End to end: `llm-jax train` on a tiny corpus made here; scalars in TensorBoard; one-line CLI errors."""
import json
import random

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from llm_jax.cli import main

SCALARS = ("train/loss_bits_per_token", "train/bits_per_byte", "eval/bits_per_token", "eval/bits_per_byte",
           "optim/learning_rate", "optim/grad_norm", "optim/param_norm", "perf/tokens_per_sec",
           "perf/step_time_s", "perf/mfu")


def make_corpus(root, n_files=6, seed=0):
    """A small learnable language: sentences from a toy grammar, a little Chinese and code."""
    rng = random.Random(seed)
    nouns, verbs = ["cat", "dog", "bird", "fish", "mouse"], ["sees", "chases", "likes", "eats"]
    for i in range(n_files):
        lines = [f"the {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)}." for _ in range(300)]
        lines += ["猫看见了狗。", "def f(x):\n    return x + 1\n"]
        (root / f"doc{i}.txt").write_text("\n".join(lines), encoding="utf-8")
    return root


def tiny_args(tmp_path, *extra):
    corpus = make_corpus(tmp_path)
    return ["train", "--config", "pretrain_tiny", "--run-dir", str(tmp_path / "run"),
            "--set", f"data.sources=text:{corpus}/*.txt", "--set", "model.vocab_size=320",
            "--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.d_ff=64",
            "--set", "data.seq_len=32", "--set", "train.batch_size=8", "--set", "train.steps=60",
            "--set", "train.eval_every=20", "--set", "train.log_every=5",
            "--set", "optim.warmup_steps=5", "--set", "optim.learning_rate=1e-2", "--set", "data.max_bytes=0",
            "--set", "train.eval_batches=0", *extra]


def scalars(run_dir):
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc


def test_train_end_to_end_compression_falls(tmp_path, capsys):
    assert main(tiny_args(tmp_path, "--set", "mesh.data=2", "--set", "mesh.fsdp=-1")) == 0
    run = tmp_path / "run"
    found, acc = scalars(run)
    for tag in SCALARS:
        assert tag in found, tag
    train_bpb = [v for _, v in found["train/bits_per_byte"]]
    assert len(train_bpb) == 60 and [s for s, _ in found["train/bits_per_byte"]] == list(range(1, 61))
    assert sum(train_bpb[-10:]) / 10 < 0.6 * sum(train_bpb[:5]) / 5
    evals = found["eval/bits_per_byte"]
    assert [s for s, _ in evals] == [20, 40, 60] and evals[-1][1] < evals[0][1]
    assert "config" in acc.Tags()["tensors"]
    results = json.loads((run / "results.json").read_text())
    assert set(results["baselines_bits_per_byte"]) == {"gzip", "bz2", "xz"}
    assert (run / "tokenizer.model").exists() and json.loads((run / "config.json").read_text())["train"]["steps"] == 60
    out = capsys.readouterr().out
    assert "gzip -9" in out and "xz -9e" in out


def test_existing_run_without_checkpoint_is_not_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert main(tiny_args(tmp_path)) == 2
    assert "no checkpoint to resume; pass --fresh" in capsys.readouterr().err
    assert (run / "config.json").read_text() == "{}" and sorted(p.name for p in run.iterdir()) == ["config.json"]


@pytest.mark.parametrize("override, message", [
    ("mesh.data=3", "8 devices are not divisible by 3"),
    ("model.n_layer=3", "did you mean model.n_layers?"),
    ("train.batch_size=4", "cannot be split over mesh"),
    ("data.sources=text:/nonexistent/*.txt", "/nonexistent/*.txt"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, override, message):
    assert main(tiny_args(tmp_path, "--set", override)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llm-jax: error:") and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()
