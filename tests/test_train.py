"""End to end: `llm-jax train` on a tiny corpus made here; scalars in TensorBoard; one-line CLI errors."""
import json

import pytest

from llm_jax.cli.main import main

SCALARS = ("train/loss_bits_per_token", "train/bits_per_byte", "eval/bits_per_token", "eval/bits_per_byte",
           "optim/learning_rate", "optim/grad_norm", "optim/param_norm", "perf/tokens_per_sec",
           "perf/step_time_s", "perf/mfu")


@pytest.mark.slow
def test_train_end_to_end_compression_falls(tmp_path, capsys, train_args, scalars):
    run = tmp_path / "run"
    assert main(train_args(run, "mesh.data=2", "mesh.fsdp=-1")) == 0
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
    assert set(results["baselines_bits_per_byte"]) == {"gzip", "bz2", "xz", "gzip_primed", "bz2_primed", "xz_primed"}
    assert (run / "tokenizer.model").exists() and json.loads((run / "config.json").read_text())["train"]["steps"] == 60
    out = capsys.readouterr().out
    assert "gzip -9" in out and "xz -9e" in out and "xz -9e primed" in out


def test_existing_run_without_checkpoint_is_not_overwritten(tmp_path, capsys, train_args):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert main(train_args(run)) == 2
    assert "holds a run of another config with no checkpoint" in capsys.readouterr().err
    assert (run / "config.json").read_text() == "{}" and sorted(p.name for p in run.iterdir()) == ["config.json"]


@pytest.mark.parametrize("override, message", [
    ("mesh.data=3", "8 devices are not divisible by 3"),
    ("model.n_layer=3", "did you mean model.n_layers?"),
    ("train.batch_size=4", "cannot be split over mesh"),
    ("data.sources=text:/nonexistent/*.txt", "/nonexistent/*.txt"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, override, message, train_args):
    assert main(train_args(tmp_path / "run", override)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llm-jax: error:") and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()
