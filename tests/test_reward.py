"""The reward model: pooling at the last real token, the Bradley-Terry loss by hand, a planted preference
learnt end to end, fine-tuning a language-model export into a reward model, and `llm-jax score`."""
import dataclasses
import json
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from llm_jax import tasks
from llm_jax.cli.main import main
from llm_jax.config import Config, MeshConfig, RewardConfig, llama, to_json, validate
from llm_jax.data.batches import PairBatch, positions_from_segments, split_microbatches
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.errors import ConfigError
from llm_jax.experiment import apply_overrides, load_experiment
from llm_jax.model import Transformer
from llm_jax.parallel import sharding
from llm_jax.sweep.report import summarise_run
from llm_jax.tasks.reward import RewardModel, pair_sums, scalars as reward_scalars
from llm_jax.train import optim, step
from llm_jax.train.export import load_params
from llm_jax.train.state import abstract_state, create_state


def reward_model(**overrides):
    shape = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    return llama(**{**shape, **overrides}, reward_init_std=0.5, compute_dtype="float32")


@pytest.mark.parametrize("position", ["rope", pytest.param("learned", marks=pytest.mark.slow)])
def test_reward_reads_the_last_real_token_whatever_the_padding(position):
    cfg = reward_model(position=position, max_seq_len=32)
    model = Transformer(cfg, head="reward")
    lengths = [3, 7, 5]
    rng = np.random.default_rng(0)
    seqs = [rng.integers(8, 64, n).astype(np.int32) for n in lengths]
    params = nn.unbox(model.init(jax.random.key(0), *(jnp.ones((1, 4), jnp.int32),) * 3))["params"]
    apply = jax.jit(model.apply)

    def alone(ids):  # no padding at all
        n = len(ids)
        return float(apply({"params": params}, ids[None], np.arange(n)[None], np.ones((1, n), np.int32))[0])

    def padded(width, side):
        tokens = np.zeros((len(seqs), width), np.int32)
        segments, positions = np.zeros_like(tokens), np.zeros_like(tokens)
        for row, ids in enumerate(seqs):
            cols = slice(0, len(ids)) if side == "right" else slice(width - len(ids), width)
            tokens[row, cols], segments[row, cols], positions[row, cols] = ids, 1, np.arange(len(ids))
        return np.asarray(apply({"params": params}, tokens, positions, segments))

    expected = [alone(ids) for ids in seqs]
    assert len(set(np.round(expected, 4))) == 3  # the rows really differ, so a wrong index would show
    for width in (7, 12, 20):
        for side in ("right", "left"):
            np.testing.assert_allclose(padded(width, side), expected, rtol=1e-5, atol=1e-5, err_msg=(width, side))


def hand_loss(rc, rr, margin, coef):
    d = rc - rr - margin
    return math.log1p(math.exp(-d)) + coef * (rc + rr) ** 2  # -log sigmoid(d) + centring


def test_pair_loss_equals_a_hand_computation_with_margin_and_centring():
    rc, rr = np.array([1.5, -0.2, 0.3, 2.0]), np.array([0.5, 0.4, 0.3, -1.0])
    margin, valid = np.array([0.0, 0.25, 1.0, 0.5]), np.array([1.0, 1.0, 1.0, 0.0])  # the last pair is padding
    coef = 0.01
    sums = pair_sums(jnp.array(rc), jnp.array(rr), jnp.array(margin), jnp.array(valid), coef)
    expected = [hand_loss(c, r, m, coef) for c, r, m in zip(rc[:3], rr[:3], margin[:3])]
    np.testing.assert_allclose(float(sums["loss"]), sum(expected), rtol=1e-6)
    bt = [math.log1p(math.exp(-(c - r - m))) for c, r, m in zip(rc[:3], rr[:3], margin[:3])]
    out = reward_scalars(sums, "train")
    np.testing.assert_allclose(float(out["train/loss_bits_per_pair"]), sum(bt) / 3 / math.log(2), rtol=1e-6)
    np.testing.assert_allclose(float(out["train/accuracy"]), (1 + 0 + 0.5) / 3)  # the third pair is a tie
    np.testing.assert_allclose(float(out["train/margin"]), (1.0 - 0.6 + 0.0) / 3, rtol=1e-6)
    np.testing.assert_allclose(float(out["train/reward_chosen"]), rc[:3].mean(), rtol=1e-6)
    answers = np.concatenate([rc[:3], rr[:3]])
    np.testing.assert_allclose(float(out["train/reward_mean"]), answers.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(out["train/reward_std"]), answers.std(), rtol=1e-5)
    # A zero reward head is a coin flip: exactly one bit per pair.
    zero = pair_sums(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), jnp.ones(3), 0.0)
    np.testing.assert_allclose(float(reward_scalars(zero, "eval")["eval/loss_bits_per_pair"]), 1.0, rtol=1e-6)


def test_swapping_chosen_and_rejected_negates_the_margin_and_flips_accuracy():
    rng = np.random.default_rng(1)
    rc, rr = jnp.array(rng.normal(size=16)), jnp.array(rng.normal(size=16))
    zeros, ones = jnp.zeros(16), jnp.ones(16)
    fwd = reward_scalars(pair_sums(rc, rr, zeros, ones, 0.0), "t")
    back = reward_scalars(pair_sums(rr, rc, zeros, ones, 0.0), "t")
    np.testing.assert_allclose(float(back["t/margin"]), -float(fwd["t/margin"]), rtol=1e-6)
    np.testing.assert_allclose(float(back["t/accuracy"]), 1 - float(fwd["t/accuracy"]), rtol=1e-6)
    assert 0 < float(fwd["t/accuracy"]) < 1


# --- end to end: a planted preference ---------------------------------------------------------------------

WORDS = "the a river stone cloud garden window music bread lamp quiet bright green slow warm old new".split()
POLITE, RUDE = "Thank you kindly.", "Go away now."


def planted_pairs(n, seed):
    """Pairs whose answers share a random body; the chosen one ends politely, the rejected one rudely."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        prompt = "Tell me about the " + " ".join(rng.choices(WORDS, k=rng.randint(1, 2))) + "."
        body = " ".join(rng.choices(WORDS, k=rng.randint(1, 5))).capitalize() + "."
        lines.append({"prompt": prompt, "chosen": f"{body} {POLITE}", "rejected": f"{body} {RUDE}"})
    return lines


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    text = [" ".join(WORDS).capitalize() + f". {POLITE} {RUDE} Tell me about the river.\n"] * 20
    path = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer(text, path, vocab_size=320)
    return f"{path}.model"


@pytest.mark.slow
def test_a_tiny_reward_model_learns_a_planted_preference_and_scores_new_pairs(tmp_path, tokenizer_path, capsys,
                                                                             scalars):
    write_jsonl(tmp_path / "pairs.jsonl", planted_pairs(400, seed=0))
    run = tmp_path / "rm"
    assert main(["train", "--config", "rm_tiny", "--run-dir", str(run), "--set", f"data.data_dir={tmp_path}",
                 "--set", f"data.tokenizer={tokenizer_path}"]) == 0
    out = capsys.readouterr().out
    assert "preference pairs" in out and "held-out pairs: 80" in out
    results = json.loads((run / "results.json").read_text())
    assert results["eval/pairs"] == 80 and results["eval/accuracy"] > 0.95, results
    assert results["eval/loss_bits_per_pair"] < 0.3, results
    series, _ = scalars(run)
    for name in ("loss_bits_per_pair", "accuracy", "margin", "reward_chosen", "reward_rejected"):
        assert f"train/{name}" in series and f"eval/{name}" in series, name
    assert series["train/loss_bits_per_pair"][0][1] == pytest.approx(1.0, abs=1e-6)  # zero head: a coin flip

    # New pairs (another seed, not in the training file), single responses, and an unusable line.
    new = planted_pairs(40, seed=123)
    records = new + [{"prompt": "Tell me about the lamp.", "response": f"Warm. {POLITE}"},
                     {"prompt": "Tell me about the lamp.", "response": f"Warm. {RUDE}"},
                     {"prompt": "x", "chosen": "same", "rejected": "same"}]
    write_jsonl(tmp_path / "new.jsonl", records)
    assert main(["score", "--checkpoint", str(run), "--input", str(tmp_path / "new.jsonl"),
                 "--output", str(tmp_path / "scores.jsonl")]) == 0
    summary = capsys.readouterr().out
    assert "scored 2 responses and 40 pairs" in summary and "identical answers: 1" in summary
    assert "normalised by the eval mean" in summary
    scored = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [s["line"] for s in scored] == list(range(1, len(records) + 1))
    accuracy = np.mean([s["preferred"] == "chosen" for s in scored[:40]])
    assert accuracy > 0.95
    polite, rude = scored[40], scored[41]
    assert polite["reward"] > rude["reward"]
    # normalised = (raw - mean) / std with the statistics the final checkpoint holds
    mean, std = results["eval/reward_mean"], results["eval/reward_std"]
    assert polite["reward"] == pytest.approx((polite["raw_reward"] - mean) / std, rel=1e-5)
    assert scored[42] == {"line": 43, "skipped": "identical answers"}

    # The sweep report sums a reward model up in its own terms, and language-model commands refuse it.
    summary = summarise_run(run, "rm", {})
    assert summary.headline == "eval bits/pair" and summary.scores["eval accuracy"] == results["eval/accuracy"]
    assert summary.tokens == 60 * 16 * 2 * 64  # steps x pairs x 2 answers x seq_len
    for argv in (["sample", "--prompt", "x"], ["compress", str(tmp_path / "new.jsonl"), str(tmp_path / "x")]):
        assert main([argv[0], "--checkpoint", str(run), *argv[1:]]) == 2
        assert "is a reward model (task=reward), not the language model" in capsys.readouterr().err


def test_a_language_model_export_initialises_the_reward_model_trunk(tmp_path, tokenizer_path):
    cfg = validate(load_experiment("rm_tiny"))
    lm_cfg = dataclasses.replace(cfg, task="pretrain", data=dataclasses.replace(cfg.data, sources=("python_stdlib",)))
    lm_params = nn.unbox(Transformer(lm_cfg.model).init(jax.random.key(7), *(jnp.ones((1, 8), jnp.int32),) * 3))
    export = tmp_path / "export"
    export.mkdir()
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((export / "params").absolute(), lm_params["params"])
    (export / "config.json").write_text(to_json(lm_cfg))
    mesh = sharding.make_mesh(MeshConfig(1, -1, 1))
    model, optimizer = Transformer(cfg.model, head="reward"), optim.make_optimizer(cfg.optim)
    state, _ = create_state(model, optimizer, abstract_state(model, optimizer, mesh, 64), 64, jax.random.key(0))
    params, fresh = load_params(export, cfg, state.params)
    assert fresh == ["reward_head"] and "lm_head" not in params
    np.testing.assert_array_equal(params["embed"]["embedding"], lm_params["params"]["embed"]["embedding"])
    np.testing.assert_array_equal(params["layer_1"]["mlp"]["up"]["kernel"],
                                  lm_params["params"]["layer_1"]["mlp"]["up"]["kernel"])
    assert not np.any(params["reward_head"]["kernel"])  # zero init: every pair starts at exactly one bit
    assert params["embed"]["embedding"].sharding == state.params["embed"]["embedding"].sharding


def test_a_reward_model_needs_preference_data_and_the_reverse():
    """One key chooses objective and data together: a reward objective on documents cannot be written."""
    cfg = load_experiment("rm_tiny")
    with pytest.raises(ConfigError, match="task=reward reads hh, pairs, qa_feedback sources, not 'text'"):
        tasks.make(apply_overrides(cfg, ["data.sources=text:docs/*.txt", "data.tokenizer=t.model"]))
    with pytest.raises(ConfigError, match="task=pretrain reads .* sources, not 'pairs'"):
        tasks.make(apply_overrides(Config(), ["data.sources=pairs:pairs.jsonl"]))
    with pytest.raises(ConfigError, match="task='ppo' is not one of pretrain, sft, reward, dpo"):
        tasks.make(apply_overrides(cfg, ["task=ppo"]))
    for key in ("data.format=preference", "model.head=reward"):  # the two keys `task` replaced
        with pytest.raises(ConfigError, match="unknown config key"):
            apply_overrides(cfg, [key])


def rm_train(mesh_cfg, devices=None, microbatches=1, steps=3):
    """A few reward-model steps on random pairs of ragged lengths (a few padding pairs among them)."""
    cfg = reward_model(n_heads=8, n_kv_heads=4, head_dim=8)
    mesh = sharding.make_mesh(mesh_cfg, devices)
    model = Transformer(cfg, head="reward")
    ocfg = dataclasses.replace(Config().optim, learning_rate=1e-2, warmup_steps=1)
    optimizer = optim.make_optimizer(ocfg)
    task = RewardModel(Config(task="reward", reward=RewardConfig(center_coef=0.01)))
    state, shardings = create_state(model, optimizer, abstract_state(model, optimizer, mesh, 16), 16, jax.random.key(0))
    train_fn = step.jit_train_step(model, optimizer, ocfg, mesh, shardings, task, {})
    rng, history = np.random.default_rng(0), []
    for _ in range(steps):
        lengths = rng.integers(3, 17, (8, 2))
        segment_ids = (np.arange(16)[None, None] < lengths[..., None]).astype(np.int32)
        batch = PairBatch(inputs=rng.integers(8, 64, (8, 2, 16)).astype(np.int32) * segment_ids,
                          positions=positions_from_segments(segment_ids), segment_ids=segment_ids,
                          margin=rng.random(8).astype(np.float32), valid=(rng.random(8) < 0.8).astype(np.float32))
        batch = split_microbatches(microbatches, batch)
        state, metrics = train_fn(state, sharding.global_batch(batch, step.batch_shardings(mesh, task, True)), {})
        history.append({k: float(v) for k, v in metrics.items()})
    return history


@pytest.mark.slow
def test_reward_training_is_the_same_on_one_device_on_a_mesh_and_with_microbatches():
    reference = rm_train(MeshConfig(1, 1, 1), jax.devices()[:1])
    history = rm_train(MeshConfig(2, 2, 2), microbatches=2)  # both at once: 8 devices, 2 accumulated halves
    for key in ("train/loss_bits_per_pair", "train/accuracy", "train/margin", "optim/grad_norm"):
        np.testing.assert_allclose([h[key] for h in history], [h[key] for h in reference], rtol=2e-5, atol=1e-6,
                                   err_msg=key)
    assert reference[-1]["train/loss_bits_per_pair"] != reference[0]["train/loss_bits_per_pair"]
