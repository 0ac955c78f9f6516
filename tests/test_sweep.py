"""Sweeps end to end on CPU: runs, skips, resumes, the report, the HParams data, dry runs, early errors."""
import dataclasses
import os
import shutil

import pytest
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment, list_session_groups

from llm_jax.cli.main import main
from llm_jax.config import to_json
from llm_jax.errors import ConfigError
from llm_jax.experiment import apply_overrides, from_command_line, load_experiment
from llm_jax.model.flops import flops_per_token
from llm_jax.sweep.plan import RESTART_AFRESH, _labels, load_sweep, plan, train_args
from llm_jax.sweep.report import write_report
from llm_jax.sweep.run import run_sweep

TINY = ("model.vocab_size=320", "model.d_model=32", "model.d_ff=64", "data.seq_len=32", "train.batch_size=8",
        "train.steps=12", "train.eval_every=6", "train.log_every=3", "optim.warmup_steps=3",
        "train.eval_batches=2", "checkpoint.every=6", "data.max_bytes=0", "train.time_budget_s=0", "model.mlp=swiglu",
        "optim.optimizer=adamw")


@pytest.fixture
def write_sweep(tmp_path, corpus):
    """write_sweep(grid, points) -> a sweep file of the tiny run on the toy corpus."""
    def write(grid='{"model.n_layers": (1, 2)}', points="()"):
        overrides = (f"data.sources=text:{corpus}/*.txt",) + TINY
        path = tmp_path / "tiny_sweep.py"
        path.write_text("from llm_jax.sweep.plan import Sweep\n\n\ndef sweep():\n"
                        f"    return Sweep(base='pretrain_tiny', grid={grid}, points={points}, overrides={overrides!r})\n")
        return path
    return write


def report_table(sweep_dir):
    """The report's runs table as {run: {column: text}}."""
    lines = [line for line in (sweep_dir / "report.md").read_text().splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]
    return {row["run"]: row for row in rows if "params" in row}


def hparams_dashboard(logdir):
    """What TensorBoard's HParams dashboard would show for logdir, through its own backend."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    tb = base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer,
                               data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(logdir)))
    backend, request = backend_context.Context(tb), context.RequestContext()
    experiment = get_experiment.Handler(request, backend, "", api_pb2.GetExperimentRequest()).run()
    groups = list_session_groups.Handler(request, backend, "", api_pb2.ListSessionGroupsRequest(
        start_index=0, slice_size=100, allowed_statuses=[api_pb2.STATUS_UNKNOWN])).run()
    return experiment, groups


@pytest.mark.slow
def test_sweep_runs_skips_resumes_and_reports(tmp_path, capfd, monkeypatch, write_sweep):
    # The runs' own processes: one device each, compiled least optimised as the suite's are (conftest.py).
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    path, sweep_dir = write_sweep(), tmp_path / "sweep"
    assert run_sweep(path, sweep_dir=sweep_dir) == 0
    out = capfd.readouterr().out
    assert out.count("prepared data in") == 1 and "=== n_layers=1" in out and "=== n_layers=2" in out
    first, second = sweep_dir / "n_layers=1", sweep_dir / "n_layers=2"
    mtimes = [(run / "results.json").stat().st_mtime_ns for run in (first, second)]

    assert run_sweep(path, sweep_dir=sweep_dir) == 0  # both finished: nothing runs
    out = capfd.readouterr().out
    assert "n_layers=1: finished" in out and "n_layers=2: finished" in out and "===" not in out
    assert [(run / "results.json").stat().st_mtime_ns for run in (first, second)] == mtimes

    (second / "results.json").unlink()  # as if killed between the checkpoints of steps 6 and 12
    shutil.rmtree(second / "checkpoints" / "12")
    assert "| n_layers=2 | unfinished: checkpoint at step 6 of 12 | 12 |" in write_report(sweep_dir).read_text()
    assert run_sweep(path, sweep_dir=sweep_dir) == 0
    out = capfd.readouterr().out
    assert "n_layers=2: resume from step 6" in out and "resuming from step 6" in out and "=== n_layers=1" not in out
    assert (second / "results.json").exists() and len(list((second / "tb").glob("*.sweep-hparams"))) == 1

    table = report_table(sweep_dir)
    assert list(table) == ["n_layers=1", "n_layers=2"]
    assert int(table["n_layers=1"]["params"].replace(",", "")) < int(table["n_layers=2"]["params"].replace(",", ""))
    cfg = apply_overrides(load_experiment("pretrain_tiny"), list(TINY) + ["model.n_layers=2"])
    assert float(table["n_layers=2"]["training FLOPs"]) == pytest.approx(
        flops_per_token(cfg.model, 32) * 12 * 8 * 32, rel=1e-3)
    for row in table.values():
        assert 0 < float(row["eval bits/byte"]) < 8 and 0 < float(row["train bits/token"]) < 9
        assert float(row["tokens/s"].replace(",", "")) > 0
    for png in ("eval_vs_swept.png", "eval_vs_flops.png", "eval_curves.png"):
        assert (sweep_dir / png).stat().st_size > 1000 and f"]({png})" in (sweep_dir / "report.md").read_text()

    experiment, groups = hparams_dashboard(sweep_dir)
    [info] = experiment.hparam_infos
    assert info.name == "model.n_layers" and [v.number_value for v in info.domain_discrete.values] == [1, 2]
    assert {m.name.tag for m in experiment.metric_infos} >= {"eval/bits_per_byte", "train/loss_bits_per_token"}
    by_name = {g.name: g for g in groups.session_groups}
    assert sorted(by_name) == ["n_layers=1", "n_layers=2"]
    assert by_name["n_layers=2"].hparams["model.n_layers"].number_value == 2
    eval_bpb = {m.name.tag: m.value for m in by_name["n_layers=2"].metric_values}["eval/bits_per_byte"]
    assert eval_bpb == pytest.approx(float(table["n_layers=2"]["eval bits/byte"]), abs=1e-4)


def test_dry_run_prints_commands_and_writes_nothing(tmp_path, capfd, write_sweep):
    path, sweep_dir = write_sweep(), tmp_path / "sweep"
    assert run_sweep(path, sweep_dir=sweep_dir, dry_run=True, extra_overrides=["train.steps=5"]) == 0
    out = capfd.readouterr().out
    assert "n_layers=1: new" in out and out.count(" -m llm_jax train --config pretrain_tiny") == 2
    assert out.count(" -m llm_jax prepare ") == 1 and "--set train.steps=5" in out
    assert run_sweep(path, "slurm", sweep_dir=sweep_dir, dry_run=True,
                     launcher_options={"gpus_per_node": 4, "partition": "gpu", "time": None}) == 0
    out = capfd.readouterr().out
    assert out.count("#SBATCH --gpus-per-node=4") == 2 and out.count("llm-jax prepare") == 2
    assert run_sweep(path, "local-multiprocess", sweep_dir=sweep_dir, dry_run=True,
                     launcher_options={"num_processes": 2}) == 0
    assert capfd.readouterr().out.count("--num-processes 2 --process-id") == 4
    assert run_sweep(path, "tpu", sweep_dir=sweep_dir, dry_run=True,
                     launcher_options={"tpu_name": "t", "zone": "z"}) == 0
    out = capfd.readouterr().out
    assert out.count("tpu-vm scp") == 1 and out.count("llm-jax prepare") == 1 and out.count("llm-jax train") == 2
    # The same through the CLI, launcher options as flags.
    assert main(["sweep", str(path), "--sweep-dir", str(sweep_dir), "--dry-run", "--launcher", "slurm",
                 "--gpus-per-node", "2", "--nodes", "2", "--set", "train.steps=5"]) == 0
    out = capfd.readouterr().out
    assert out.count("#SBATCH --nodes=2") == 2 and out.count("--set train.steps=5") >= 2
    assert not sweep_dir.exists()


def test_an_attempt_of_the_same_config_restarts_in_place_and_another_is_deleted(tmp_path, capfd, write_sweep):
    """What `train` itself does with the directory decides the point's state: the same config restarts from
    step 0 (the sweep keeps the directory), another config's attempt is the sweep's to delete."""
    path, sweep_dir = write_sweep(), tmp_path / "sweep"
    sweep = load_sweep(path)
    same, other = plan(sweep, sweep_dir)
    trained = {}
    for run in (same, other):  # the config `train` resolves from the point's command line and writes
        argv = train_args(sweep, run)
        trained[run.name] = from_command_line(sweep.base, [v for k, v in zip(argv, argv[1:]) if k == "--set"])
    for run, cfg in ((same, trained[same.name]), (other, dataclasses.replace(trained[other.name], name="edited"))):
        run.run_dir.mkdir(parents=True)
        (run.run_dir / "config.json").write_text(to_json(cfg))
    assert run_sweep(path, sweep_dir=sweep_dir, dry_run=True) == 0
    out = capfd.readouterr().out
    assert f"{same.name}: restart from step 0" in out and f"{other.name}: {RESTART_AFRESH}" in out


def test_slurm_writes_and_submits_a_script_per_point_and_keeps_going(tmp_path, capfd, monkeypatch, write_sweep):
    bin_dir, submitted = tmp_path / "bin", tmp_path / "submitted"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\necho "$1" >> {submitted}\ncase "$1" in *n_layers=1*) exit 1;; esac\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    path, sweep_dir = write_sweep(), tmp_path / "sweep"
    (sweep_dir / "n_layers=2").mkdir(parents=True)  # an earlier attempt that died before its first checkpoint
    (sweep_dir / "n_layers=2" / "config.json").write_text("{}")
    assert run_sweep(path, "slurm", sweep_dir=sweep_dir, launcher_options={"setup": "source venv/bin/activate"}) == 1
    out, err = capfd.readouterr()
    assert "n_layers=2: restart" in out and "failed: n_layers=1 (exit status 1)" in err
    assert not (sweep_dir / "n_layers=2" / "config.json").exists()
    scripts = [sweep_dir / "slurm" / f"n_layers={n}.sbatch" for n in (1, 2)]
    assert submitted.read_text().split() == [str(p) for p in scripts]
    script = scripts[1].read_text()
    assert script.index("source venv/bin/activate") < script.index("llm-jax prepare") < script.index("srun")
    assert f"--run-dir {sweep_dir}/n_layers=2 " in script and "--fresh" not in script
    assert run_sweep(path, "slurm", sweep_dir=sweep_dir) == 1  # neither run has started: both submitted again
    assert len(submitted.read_text().split()) == 4
    assert all(len(list((sweep_dir / f"n_layers={n}" / "tb").glob("*.sweep-hparams"))) == 1 for n in (1, 2))
    assert "| n_layers=1 | not started | 0 |" in write_report(sweep_dir).read_text()


def test_sweep_passes_requeue_to_the_slurm_script(tmp_path, capsys, write_sweep):
    argv = ["sweep", str(write_sweep()), "--sweep-dir", str(tmp_path / "sweep"), "--dry-run", "--launcher"]
    assert main([*argv, "slurm", "--requeue"]) == 0
    out = capsys.readouterr().out
    assert out.count("#SBATCH --requeue") == 2 and out.count('scontrol requeue "$SLURM_JOB_ID"') == 2
    assert main([*argv, "slurm"]) == 0 and "scontrol" not in capsys.readouterr().out
    assert main([*argv, "tpu", "--requeue"]) == 2
    assert "launcher tpu takes no option requeue" in capsys.readouterr().err


@pytest.mark.parametrize("grid, points, message", [
    ('{"model.n_layer": (1, 2)}', "()", "did you mean model.n_layers?"),
    ('{"model.n_layers": (1, 0)}', "()", "point n_layers=0: model.n_layers=0 must be positive"),
    ('{"model.n_layers": (1, 2)}', '({"model.n_layers": 2},)', "points n_layers=2 and n_layers=2 are the same run"),
    ('{"model.n_layers": (1, 3)}', "({},)", "points n_layers=3 and base are the same run"),
    ('{"train.steps": (1, 2)}', "()", "train.steps is swept and also overridden"),
    ("{}", "()", "has no points"),
])
def test_bad_sweep_is_one_line_error_before_anything_runs(tmp_path, capfd, grid, points, message, write_sweep):
    path, sweep_dir = write_sweep(grid, points), tmp_path / "sweep"
    with pytest.raises(ConfigError) as error:
        run_sweep(path, sweep_dir=sweep_dir)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not sweep_dir.exists() and "===" not in capfd.readouterr().out
    with pytest.raises(ConfigError, match="no sweep.json"):
        write_report(sweep_dir)


def test_run_names():
    assert _labels(["model.n_layers", "optim.learning_rate"]) == {"model.n_layers": "n_layers",
                                                                  "optim.learning_rate": "learning_rate"}
    assert _labels(["a.eps", "b.eps", "c.d"]) == {"a.eps": "a.eps", "b.eps": "b.eps", "c.d": "d"}
