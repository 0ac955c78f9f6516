"""Checkpoint, resume and fault tolerance, end to end on a tiny corpus.

Resume == uninterrupted (bit for bit on CPU; after a SIGKILL at any moment: test_restart.py), elastic resume
on another mesh, preemption by SIGTERM/SIGINT (exit 75), damaged checkpoints moved aside, non-finite steps,
export / init_from, and the run-directory rules (--fresh, bad inputs). Runs that get a signal are subprocesses;
the rest run in-process.
"""
import hashlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
import pytest

from conftest import set_flags
from llm_jax.cli.main import main
from llm_jax.experiment import apply_overrides, load_experiment
from llm_jax.train import checkpoint, loop

REPO = Path(__file__).resolve().parent.parent
LOSS, GRAD_NORM = "train/loss_bits_per_token", "optim/grad_norm"
E = 10  # checkpoint.every of the in-process runs, which train 2E steps
VOCAB = 320


# ---------------------------------------------------------------------------------------------- helpers

# The conftest's tiny run, 2E steps, checkpointed every E.
RUN = (f"train.steps={2 * E}", "train.eval_every=1000", f"checkpoint.every={E}", "checkpoint.keep=5")


@pytest.fixture(scope="module")
def overrides(tiny_overrides):
    return lambda *extra: [*tiny_overrides, *RUN, *extra]


@pytest.fixture(scope="module")
def train_argv(train_args):
    return lambda run_dir, *extra, flags=(): train_args(run_dir, *RUN, *extra, flags=flags)


@pytest.fixture(scope="module")
def events(scalars):
    """events(run_dir, tag): every event of `tag`, duplicates included, in file order."""
    def read(run_dir, tag=LOSS):
        acc = scalars(run_dir, every_point=True)[1]
        return acc.Scalars(tag) if tag in acc.Tags()["scalars"] else []
    return read


@pytest.fixture(scope="module")
def assert_each_step_once(events):
    def check(run_dir, total, tag=LOSS):
        steps = sorted(e.step for e in events(run_dir, tag))
        assert steps == list(range(1, total + 1)), f"{tag}: steps {steps}"
    return check


def by_step(evs):
    return {e.step: e.value for e in evs}


def committed(run_dir):
    """Committed checkpoint steps: only a finished save has a directory named by the bare step."""
    root = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and p.is_dir()) if root.is_dir() else []


def snapshot(root):
    """Every file under `root` with its size, mtime and content hash."""
    root = Path(root)
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns,
                                       hashlib.sha256(p.read_bytes()).digest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def lines_with(text, word):
    return [line for line in text.splitlines() if word in line]


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def finished(train_argv, tmp_path_factory):
    """A completed in-process run of 2E steps with checkpoints at E and 2E; tests that change it copy it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(train_argv(run)) == 0
    assert committed(run) == [E, 2 * E]
    return run


def copy_run(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    time.sleep(0.05)  # new files get later mtimes than the copied ones
    return dst


# ---------------------------------------------------------------------------------------------- subprocesses

class Runs:
    """`python -m llm_jax train` subprocesses whose output goes to files; all killed at teardown."""

    def __init__(self, root, env):
        self.root, self.env, self.procs = root, env, []

    def start(self, name, argv):
        out, err = open(self.root / f"{name}.out", "w"), open(self.root / f"{name}.err", "w")
        proc = subprocess.Popen([sys.executable, "-m", "llm_jax", *argv], cwd=REPO, env=self.env,
                                stdout=out, stderr=err)
        out.close(), err.close()
        proc.name = name
        self.procs.append(proc)
        return proc

    def stderr(self, proc):
        return (self.root / f"{proc.name}.err").read_text()

    def wait(self, proc, timeout):
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"{proc.name} did not finish within {timeout} s: {self.stderr(proc)[-2000:]}")

    def run(self, name, argv, timeout=240):
        proc = self.start(name, argv)
        return self.wait(proc, timeout), proc

    def wait_for_checkpoint(self, proc, run_dir, step, timeout=240):
        deadline = time.monotonic() + timeout
        while step not in committed(run_dir):
            assert proc.poll() is None, (f"{proc.name} exited ({proc.returncode}) before checkpoint {step}: "
                                         f"{self.stderr(proc)[-2000:]}")
            assert time.monotonic() < deadline, f"no checkpoint {step} after {timeout} s"
            time.sleep(0.01)

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def runs(tmp_path):
    r = Runs(tmp_path, dict(os.environ))
    yield r
    r.close()


# A run long enough that a signal right after the first checkpoint lands mid-run (a slightly bigger model).
TOTAL = 100
LONG = ("model.d_model=64", "model.d_ff=128", f"train.steps={TOTAL}")


# ---------------------------------------------------------------------------------------------- resume

@pytest.mark.slow
def test_resume_continues_the_curve_with_the_same_losses(finished, tmp_path, train_argv, events, assert_each_step_once):
    """Checkpoint 2E lost (as if killed after E): the resumed run retrains E+1..2E, each step once in TB.
    Checkpoint E is rewritten as versions before the time budget wrote it, without `planned_steps` in the state:
    it still resumes, to the same losses."""
    run = copy_run(finished, tmp_path / "run")
    original = {tag: by_step(events(run, tag)) for tag in (LOSS, GRAD_NORM)}
    shutil.rmtree(run / "checkpoints" / str(2 * E))
    (run / "results.json").unlink()
    state_dir = (run / "checkpoints" / str(E) / "state").absolute()
    with ocp.StandardCheckpointer() as ckpt:
        old_state = ckpt.restore(state_dir)
    del old_state["planned_steps"]
    shutil.rmtree(state_dir)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(state_dir, old_state)
    t0 = time.time()
    assert main(train_argv(run)) == 0
    assert (run / "results.json").exists() and committed(run) == [E, 2 * E]
    assert not (run / "corrupt_checkpoints").exists()
    for tag in (LOSS, GRAD_NORM):
        assert_each_step_once(run, 2 * E, tag)
        evs = events(run, tag)
        assert all(e.wall_time < t0 for e in evs if e.step <= E), f"{tag}: steps up to {E} were rewritten"
        new = {e.step: e.value for e in evs if e.step > E}
        assert all(e.wall_time >= t0 for e in evs if e.step > E), f"{tag}: old points after the resume step"
        assert new == {s: v for s, v in original[tag].items() if s > E}, tag


@pytest.mark.slow
def test_elastic_resume_on_another_mesh(tmp_path, monkeypatch, overrides, events, assert_each_step_once):
    base = load_experiment("pretrain_tiny")
    run = tmp_path / "run"
    cfg8 = apply_overrides(base, overrides("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"))
    loop.train(cfg8, run)
    original = by_step(events(run))
    shutil.rmtree(run / "checkpoints" / str(2 * E))  # as if killed after checkpoint E
    (run / "results.json").unlink()

    restored = []
    real_restore = checkpoint.restore_latest

    def spy(*args, **kwargs):
        out = real_restore(*args, **kwargs)
        restored.append(out)
        return out

    monkeypatch.setattr(checkpoint, "restore_latest", spy)
    devices4 = jax.devices()[:4]
    # FSDP over 4: parameters really are re-split, not just replicated onto fewer devices.
    cfg4 = apply_overrides(base, overrides("mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1"))
    t0 = time.time()
    loop.train(cfg4, run, devices=devices4)

    (state, step, _), = restored
    assert step == E
    for leaf in jax.tree.leaves(state.params):
        assert leaf.sharding.device_set == set(devices4)
        assert dict(leaf.sharding.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
    kernel = state.params["layer_0"]["attn"]["q"]["kernel"]
    assert kernel.sharding.spec[0] == "fsdp" and kernel.sharding.shard_shape(kernel.shape)[0] == 32 // 4
    assert_each_step_once(run, 2 * E)
    new = {e.step: e.value for e in events(run) if e.wall_time >= t0}
    assert sorted(new) == list(range(E + 1, 2 * E + 1))
    for s, v in new.items():  # another mesh sums in another order: close, not equal
        assert v == pytest.approx(original[s], rel=1e-4), s
    assert committed(run) == [E, 2 * E]


# ---------------------------------------------------------------------------------------------- run directory

@pytest.mark.slow
def test_fresh_deletes_the_run_and_starts_over(finished, tmp_path, train_argv, events, assert_each_step_once):
    run = copy_run(finished, tmp_path / "run")
    t0 = time.time()
    assert main(train_argv(run, flags=["--fresh"])) == 0
    assert committed(run) == [E, 2 * E]
    assert_each_step_once(run, 2 * E)
    assert all(e.wall_time >= t0 for e in events(run))
    old = [p for p in (run / "checkpoints").rglob("*") if p.is_file() and p.stat().st_mtime < t0 - 0.02]
    assert not old, old[:3]


def test_run_without_checkpoint_needs_fresh(tmp_path, capsys, train_argv):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    before = snapshot(run)
    assert main(train_argv(run)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llm-jax: error:") and "\n" not in err and "--fresh" in err, err
    assert snapshot(run) == before and sorted(p.name for p in run.iterdir()) == ["config.json"]
    assert main(train_argv(run, "train.steps=2", flags=["--fresh"])) == 0
    assert committed(run) == [2]


@pytest.mark.slow
def test_keep_last_and_every_period_and_always_the_end(tmp_path, train_argv):
    run = tmp_path / "run"  # synchronous saves here; every other test uses the default, asynchronous
    assert main(train_argv(run, "train.steps=13", "checkpoint.every=2", "checkpoint.keep=2",
                           "checkpoint.keep_period=4", "checkpoint.async_save=false")) == 0
    # the last two (12, 13: the end is always saved) and every 4th step
    assert committed(run) == [4, 8, 12, 13]


def test_changed_model_is_refused_and_checkpoints_untouched(finished, capsys, train_argv):
    before = snapshot(finished / "checkpoints"), (finished / "config.json").read_bytes()
    assert main(train_argv(finished, "model.n_layers=3")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llm-jax: error:") and "\n" not in err and "model.n_layers" in err, err
    assert (snapshot(finished / "checkpoints"), (finished / "config.json").read_bytes()) == before


def test_other_tokenizer_is_refused_and_checkpoints_untouched(finished, tmp_path, capsys, train_argv, overrides):
    other = tmp_path / "other_data"  # the same corpus, tokenized by a unigram model instead of BPE
    assert main(["prepare", "--config", "pretrain_tiny", "--out", str(other)]
                + set_flags(overrides("data.tokenizer_type=unigram"))) == 0
    capsys.readouterr()
    before = snapshot(finished / "checkpoints")
    assert main(train_argv(finished, f"data.prepared={other}")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llm-jax: error:") and "\n" not in err and "tokenizer differs" in err, err
    assert snapshot(finished / "checkpoints") == before


def test_too_little_disk_space_fails_before_training(tmp_path, capsys, monkeypatch, train_argv):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    run = tmp_path / "run"
    assert main(train_argv(run)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llm-jax: error:") and "not enough free space" in err and str(run) in err, err
    assert not run.exists()  # a run that never started leaves nothing behind


@pytest.mark.parametrize("where", ["under_a_file", "is_a_file"])
def test_unwritable_run_dir_is_exit_2_before_training(tmp_path, capsys, where, train_argv):
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    run = afile / "run" if where == "under_a_file" else afile
    assert main(train_argv(run)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("llm-jax: error:") and "\n" not in err and str(run) in err, err
    assert "prepared" not in captured.out  # failed before tokenising
    assert afile.read_text() == "not a directory"


# ---------------------------------------------------------------------------------------------- signals

@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_preemption_checkpoints_and_exits_75(tmp_path, runs, sig, train_argv, events, assert_each_step_once):
    run = tmp_path / "run"
    argv = train_argv(run, *LONG)
    proc = runs.start("preempted", argv)
    runs.wait_for_checkpoint(proc, run, E)
    assert proc.poll() is None, "the run finished before the signal: make it longer"
    proc.send_signal(sig)
    assert runs.wait(proc, 60) == 75, runs.stderr(proc)[-2000:]
    assert "preempted" in runs.stderr(proc)
    stopped = max(committed(run))
    assert E <= stopped < TOTAL and not (run / "results.json").exists()
    # It saved the step it stopped at: the last step it logged.
    assert max(e.step for e in events(run)) == stopped
    if sig == signal.SIGTERM:
        rc, restart = runs.run("restart", argv)
        assert rc == 0, runs.stderr(restart)[-2000:]
        assert_each_step_once(run, TOTAL)
        assert (run / "results.json").exists()


# ---------------------------------------------------------------------------------------------- corruption

def _array_data_files(step_dir):
    """The files holding array bytes (OCDBT `d/` chunks); truncating only the largest file is not enough:
    after orbax merges per-process OCDBT trees, some chunk files are no longer read at all."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    return files or [max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)]


@pytest.mark.slow
def test_unreadable_checkpoint_is_moved_aside_and_the_previous_one_used(finished, tmp_path, capsys, train_argv, events,
                                                                        assert_each_step_once):
    run = copy_run(finished, tmp_path / "run")
    step_dir = run / "checkpoints" / str(2 * E)
    truncated = {}
    for path in _array_data_files(step_dir):
        truncated[path.relative_to(step_dir)] = path.stat().st_size // 2
        os.truncate(path, path.stat().st_size // 2)
    before = snapshot(run / "checkpoints" / str(E))
    t0 = time.time()
    assert main(train_argv(run, f"train.steps={3 * E}")) == 0
    unreadable = lines_with(capsys.readouterr().err, "unreadable")
    assert len(unreadable) == 1 and str(2 * E) in unreadable[0], unreadable
    moved = run / "corrupt_checkpoints" / str(2 * E)
    assert {rel: (moved / rel).stat().st_size for rel in truncated} == truncated
    assert snapshot(run / "checkpoints" / str(E)) == before
    assert committed(run) == [E, 2 * E, 3 * E]
    # Resumed from E: steps E+1.. were trained again by this run, each step once in the curve.
    assert_each_step_once(run, 3 * E)
    assert all((e.wall_time >= t0) == (e.step > E) for e in events(run))


# ---------------------------------------------------------------------------------------------- non-finite

@pytest.mark.slow
def test_nonfinite_stop_exits_3_without_a_checkpoint_after_it(tmp_path, capsys, train_argv, events):
    run = tmp_path / "run"
    assert main(train_argv(run, "train.nonfinite=stop", "optim.learning_rate=1e30",
                           "checkpoint.every=1")) == 3
    assert len(lines_with(capsys.readouterr().err, "non-finite")) == 1
    evs = events(run)
    bad = [e.step for e in evs if not math.isfinite(e.value)]
    first_bad = min(bad) if bad else max((e.step for e in evs), default=0) + 1
    assert first_bad < 2 * E, "the learning rate did not blow the run up"
    assert all(step < first_bad for step in committed(run)), (committed(run), first_bad)
    assert not (run / "results.json").exists()


@pytest.mark.slow
def test_nonfinite_skip_completes_and_counts_skipped_steps(tmp_path, train_argv, events):
    run = tmp_path / "run"
    assert main(train_argv(run, "train.nonfinite=skip", "optim.learning_rate=1e30")) == 0
    skipped = events(run, "optim/skipped_steps")
    assert skipped and skipped[-1].value > 0
    assert (run / "results.json").exists()


# ---------------------------------------------------------------------------------------------- export

@pytest.mark.slow
def test_export_then_init_from_starts_from_the_trained_params(finished, tmp_path, train_argv, events):
    out = tmp_path / "export"
    assert main(["export", "--run-dir", str(finished), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.model").is_file()
    assert (out / "tokenizer.model").read_bytes() == (finished / "tokenizer.model").read_bytes()
    assert set(p.name for p in out.iterdir()) - {"config.json", "tokenizer.model"}, "no params exported"
    assert main(["export", "--run-dir", str(finished), "--out", str(tmp_path / "export_e"),
                 "--step", str(E)]) == 0
    assert (tmp_path / "export_e" / "config.json").is_file()

    run = tmp_path / "run"
    assert main(train_argv(run, f"checkpoint.init_from={out}", "train.steps=2")) == 0
    fresh_first = events(finished)[0].value
    first = events(run)[0].value
    assert first < fresh_first - 3 and first < math.log2(VOCAB) / 2, (first, fresh_first)
