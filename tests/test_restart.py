"""A run killed at any moment continues when the same command runs again, and ends as an uninterrupted run.

Each kill is a SIGKILL at a named moment (preparing data, compiling, between steps, during an asynchronous
save, during the final evaluation, during an export), made by a small launcher that wraps one llm_jax
function to kill its own process there; the restart is the plain command. The chaos test kills a run at
seeded random times instead, several times over.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import set_flags
from llm_jax.cli.main import main
from llm_jax.train.checkpoint import committed_steps

REPO = Path(__file__).resolve().parent.parent
STEPS, EVERY = 12, 5
RUN = (f"train.steps={STEPS}", "train.eval_every=6", "train.eval_batches=2", "train.log_every=1",
       f"checkpoint.every={EVERY}", "checkpoint.keep=5")
TAGS = ("train/loss_bits_per_token", "optim/grad_norm", "eval/bits_per_byte")

# Runs `llm-jax ARGV` with the function MODULE.NAME (or MODULE.CLASS.METHOD) wrapped to SIGKILL this process
# "before" it runs or "after" it returns, at its AT-th call.
KILLER = """
import importlib, os, signal, sys
where, module, name, at, argv = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
target = importlib.import_module(module)
owner, attr = (getattr(target, name.split(".")[0]), name.split(".")[1]) if "." in name else (target, name)
original, calls = getattr(owner, attr), []
def wrapped(*args, **kwargs):
    calls.append(1)
    if where == "before" and len(calls) == at:
        os.kill(os.getpid(), signal.SIGKILL)
    out = original(*args, **kwargs)
    if where == "after" and len(calls) == at:
        os.kill(os.getpid(), signal.SIGKILL)
    return out
setattr(owner, attr, wrapped)
from llm_jax.cli.main import main
sys.exit(main(argv))
"""

# (moment, where, module, function, which call): each leaves the run directory as a kill there would.
MOMENTS = {
    "tokenizer training": ("after", "llm_jax.data.prepare", "train_tokenizer", 1),
    "tokenization": ("after", "llm_jax.data.prepare", "_tokenize", 1),
    "compilation": ("before", "llm_jax.train.step", "train_step", 1),  # traced, not yet compiled
    "between steps": ("after", "llm_jax.train.loop", "_log_train", 8),  # checkpoint 5 saved, 6..8 logged
    "an asynchronous save": ("after", "llm_jax.train.checkpoint", "save", 2),  # step 10's save in flight
    "the final evaluation": ("before", "llm_jax.train.loop", "evaluation", 2),  # step 12, before its save
    "writing the results": ("before", "llm_jax.train.loop", "_final_eval", 1),  # the last save in flight
}


def run(argv, killer=None, timeout=300):
    """`llm-jax ARGV` in a fresh process (KILLER wrapping one function if given); its exit status and stderr."""
    command = [sys.executable, "-c", KILLER, *map(str, killer), *argv] if killer else \
        [sys.executable, "-m", "llm_jax", *argv]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def assert_same_run(scalars):
    """assert_same_run(run_dir, reference): the losses, every step once, and the results of the uninterrupted
    run, bit for bit."""
    def check(run_dir, reference, tags=TAGS):
        got, expected = scalars(run_dir, every_point=True)[0], scalars(reference, every_point=True)[0]
        for tag in tags:
            assert tag in expected and got.get(tag) == expected[tag], f"{tag}: {got.get(tag)} vs {expected[tag]}"
        assert _results(run_dir) == _results(reference)
    return check


def _results(run_dir):
    """results.json less its wall-clock seconds, which differ between any two runs."""
    results = json.loads((run_dir / "results.json").read_text())
    return {k: v for k, v in results.items() if not k.endswith("_time_s")}


@pytest.fixture(scope="module")
def argv(train_args):
    return lambda run_dir: train_args(run_dir, *RUN)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, argv):
    """The uninterrupted run, in a process of its own as the restarted ones are."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    status, err = run(argv(run_dir))
    assert status == 0, err[-2000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("moment", MOMENTS)
def test_a_kill_at_any_moment_then_the_same_command_ends_as_an_uninterrupted_run(tmp_path, argv, reference, moment,
                                                                                  assert_same_run, scalars):
    run_dir = tmp_path / "run"
    status, err = run(argv(run_dir), killer=MOMENTS[moment])
    assert status == -signal.SIGKILL, f"not killed at {moment} ({status}): {err[-2000:]}"
    assert not (run_dir / "results.json").exists()
    resumed_from, restarted = max(committed_steps(run_dir), default=0), time.time()
    status, err = run(argv(run_dir))
    assert status == 0, err[-2000:]
    assert_same_run(run_dir, reference)
    # It resumed from its last checkpoint: the steps up to it are the killed run's points, the rest are new.
    events = scalars(run_dir, every_point=True)[1]
    for tag in TAGS[:2]:
        new = [e.step for e in events.Scalars(tag) if e.wall_time >= restarted]
        assert new == list(range(resumed_from + 1, STEPS + 1)), f"{tag} (resumed from {resumed_from}): {new}"
    assert not list(run_dir.glob(".data.tmp-*")) and not list((run_dir / "checkpoints").glob("*tmp*"))


@pytest.mark.slow
def test_a_killed_export_is_redone_and_an_export_made_twice_is_kept(tmp_path, reference, capsys):
    out = tmp_path / "export"
    command = ["export", "--run-dir", str(reference), "--out", str(out)]
    status, err = run(command, killer=("after", "orbax.checkpoint", "StandardCheckpointer.save", 1))
    assert status == -signal.SIGKILL and not out.exists(), err[-2000:]
    assert main(command) == 0 and "exported the params of step 12" in capsys.readouterr().out
    assert main(command) == 0 and "already exported" in capsys.readouterr().out
    with ocp.StandardCheckpointer() as ckpt:
        params = ckpt.restore((out / "params").absolute())
    leaves = jax.tree.leaves(params)
    assert leaves and all(np.isfinite(np.asarray(leaf)).all() for leaf in leaves)


@pytest.mark.slow
def test_chaos_killed_at_random_moments_ends_bit_identical(tmp_path, argv, reference, assert_same_run):
    """LLM_JAX_CHAOS_KILLS kills (3 by default) at seeded random times, each followed by the same command."""
    rng = random.Random(int(os.environ.get("LLM_JAX_CHAOS_SEED", "0")))
    run_dir, kills = tmp_path / "run", int(os.environ.get("LLM_JAX_CHAOS_KILLS", "3"))
    for _ in range(kills):
        proc = subprocess.Popen([sys.executable, "-m", "llm_jax", *argv(run_dir)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            proc.wait(timeout=rng.uniform(0.5, 12.0))  # start-up, data, compilation and steps all take seconds
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if (run_dir / "results.json").exists():
            break
    status, err = run(argv(run_dir))
    assert status == 0, err[-2000:]
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_sft_killed_while_rendering_its_dialogues_ends_as_an_uninterrupted_run(tmp_path, tiny_export,
                                                                               assert_same_run):
    """Chat data (SFT, preference pairs) is published by the same atomic path as pretraining's shards."""
    dialogues = tmp_path / "dialogues.jsonl"
    dialogues.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                                          {"role": "assistant", "content": f"{w}!"}]}) + "\n"
                                 for w in ("yes", "no", "maybe", "hello") * 10))
    sets = [f"data.sources=chat:{dialogues}", f"checkpoint.init_from={tiny_export}", "train.steps=6",
            "train.eval_every=3", "checkpoint.every=3"]
    argv = lambda run_dir: ["train", "--config", "sft_tiny", "--run-dir", str(run_dir), *set_flags(sets)]  # noqa: E731
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    assert run(argv(reference))[0] == 0
    status, err = run(argv(run_dir), killer=("after", "llm_jax.data.chat.sft", "_prepare_into", 1))
    assert status == -signal.SIGKILL and not (run_dir / "data").exists(), err[-2000:]
    status, err = run(argv(run_dir))
    assert status == 0, err[-2000:]
    assert_same_run(run_dir, reference)


@pytest.mark.slow
def test_dpo_with_lora_killed_between_steps_ends_as_an_uninterrupted_run(tmp_path, tiny_export, assert_same_run):
    """DPO with LoRA adapters on a bfloat16 base: the checkpoint holds the adapters only; the frozen base (also the
    reference, read without the adapters) is loaded again from the export by the restarted run."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"say {w}", "chosen": f"{w}!", "rejected": f"no {w}"}) + "\n"
                             for w in ("yes", "no", "maybe", "hello") * 10))
    sets = [f"data.sources=pairs:{pairs}", f"checkpoint.init_from={tiny_export}", "peft.method=lora", "peft.rank=4",
            "peft.base_dtype=bfloat16", "train.steps=8", "train.eval_every=4", "train.eval_batches=2", "train.log_every=1", "checkpoint.every=4",
            "checkpoint.keep=5", "checkpoint.async_save=false", "train.batch_size=8"]  # step 4 committed before 5
    argv = lambda run_dir: ["train", "--config", "dpo_tiny", "--run-dir", str(run_dir), *set_flags(sets)]  # noqa: E731
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    assert run(argv(reference))[0] == 0
    status, err = run(argv(run_dir), killer=("after", "llm_jax.train.loop", "_log_train", 6))
    assert status == -signal.SIGKILL and committed_steps(run_dir) == [4], err[-2000:]  # steps 5, 6 logged
    status, err = run(argv(run_dir))
    assert status == 0, err[-2000:]
    assert_same_run(run_dir, reference, tags=("train/loss_bits_per_pair", "train/kl_to_reference", "optim/grad_norm",
                                              "eval/accuracy", "eval/chosen_bits_per_byte"))


@pytest.mark.slow
def test_rl_killed_during_a_rollout_ends_as_an_uninterrupted_run(tmp_path, tiny_export, assert_same_run):
    """Checkpoint 3 is taken in the middle of a rollout's minibatches (its buffer saved with it); the kill comes
    while the next rollout generates; the restart trains on the saved buffer, then makes the same rollout. The
    frozen reference is held in bf16, as rl.frozen_dtype allows, and loaded again by the restart."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"the cat {i} sees"}) + "\n" for i in range(40)))
    sets = [f"data.sources=prompts:{prompts}", f"checkpoint.init_from={tiny_export}", "rl.reward_model=count:270",
            "rl.value_init=policy", "rl.frozen_dtype=bfloat16", "train.steps=8", "train.eval_every=4",
            "train.log_every=1", "checkpoint.every=3", "checkpoint.keep=5", "checkpoint.async_save=false"]
    argv = lambda run_dir: ["train", "--config", "ppo_tiny", "--run-dir", str(run_dir), *set_flags(sets)]  # noqa: E731
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    assert main(argv(reference)) == 0
    # Rollouts feed 4 steps each (at steps 1 and 5): the 2nd starts after checkpoint 3 and before 5.
    status, err = run(argv(run_dir), killer=("before", "llm_jax.tasks.rollout", "RolloutEngine.rollout", 2))
    assert status == -signal.SIGKILL and committed_steps(run_dir) == [3], err[-2000:]
    status, err = run(argv(run_dir))
    assert status == 0, err[-2000:]
    assert_same_run(run_dir, reference, tags=("rl/reward_mean", "rl/kl", "train/loss", "ppo/ratio_mean",
                                              "ppo/value_loss", "optim/grad_norm", "eval/score_mean"))
