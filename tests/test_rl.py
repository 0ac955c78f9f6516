"""RL from a reward model (tasks/rl.py, rollout.py, rollout_buffer.py, advantages.py): the arithmetic against
hand computations, masking, the first minibatch, the value model, config errors, and end to end: a planted
reward raised by PPO, GRPO and RLOO, the reward model's path, resume after a kill and mesh equivalence."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import set_flags
from llm_jax.cli.main import main
from llm_jax.config import Config, RLConfig, llama
from llm_jax.data.batches import RolloutBatch, positions_from_segments
from llm_jax.errors import ConfigError
from llm_jax.experiment import apply_overrides, load_experiment, resolve
from llm_jax.model.transformer import PolicyAndValue
from llm_jax.tasks import advantages as adv
from llm_jax.tasks import make
from llm_jax.tasks.rl import RL, clipped_sums

# ---------------------------------------------------------------------------------------------- arithmetic


def test_gae_is_reward_to_go_at_lambda_1_and_one_step_td_at_lambda_0():
    rng = np.random.default_rng(0)
    mask = np.zeros((3, 9), np.float32)
    mask[0, 2:6], mask[1, 4:9], mask[2, 0:3] = 1, 1, 1
    rewards = rng.standard_normal((3, 9)).astype(np.float32) * mask
    values = rng.standard_normal((3, 9)).astype(np.float32) * 5  # garbage outside the mask must not matter
    a1, ret1 = adv.gae(rewards, np.zeros_like(values), mask, gamma=1.0, lam=1.0)
    for n in range(3):
        idx = np.flatnonzero(mask[n])
        for t in idx:
            assert a1[n, t] == pytest.approx(sum(rewards[n, u] for u in idx if u >= t), abs=1e-6)
            assert ret1[n, t] == pytest.approx(a1[n, t], abs=1e-6)
    a0, _ = adv.gae(rewards, values, mask, gamma=0.9, lam=0.0)
    for n in range(3):
        idx = list(np.flatnonzero(mask[n]))
        for i, t in enumerate(idx):
            next_value = values[n, idx[i + 1]] if i + 1 < len(idx) else 0.0
            assert a0[n, t] == pytest.approx(rewards[n, t] + 0.9 * next_value - values[n, t], abs=1e-5)
    assert np.all(a0[mask == 0] == 0) and np.all(a1[mask == 0] == 0)


def test_the_reward_lands_on_the_last_answer_token_with_the_kl_on_every_answer_token():
    mask = np.array([[0, 1, 1, 1, 0], [0, 0, 0, 1, 1]], np.float32)
    kl = np.full((2, 5), 0.5, np.float32)
    rewards = adv.token_rewards(np.array([2.0, -1.0]), kl * mask, mask, kl_coef=0.1)
    np.testing.assert_allclose(rewards, [[0, -0.05, -0.05, 1.95, 0], [0, 0, 0, -0.05, -1.05]], atol=1e-6)


def test_group_advantages_kl_estimators_and_the_kl_controller():
    rewards = np.array([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])  # two prompts, k = 4
    grpo, zero = adv.group_advantages(rewards, 4, "grpo")
    np.testing.assert_allclose(grpo[:4], (rewards[:4] - 3.0) / (np.std(rewards[:4]) + 1e-4), rtol=1e-6)
    assert list(zero) == [False] * 4 + [True] * 4 and np.all(grpo[4:] == 0)
    rloo, _ = adv.group_advantages(rewards, 4, "rloo")
    np.testing.assert_allclose(rloo[:4], [1 - 11 / 3, 2 - 10 / 3, 3 - 9 / 3, 6 - 6 / 3], rtol=1e-6)
    logp, ref = np.log(np.array([0.5, 0.2])), np.log(np.array([0.25, 0.4]))
    r = ref - logp
    np.testing.assert_allclose(adv.kl_estimate(logp, ref, "k1"), -r)
    np.testing.assert_allclose(adv.kl_estimate(logp, ref, "k2"), r * r / 2)
    np.testing.assert_allclose(adv.kl_estimate(logp, ref, "k3"), np.exp(r) - 1 - r)
    assert adv.adapt_kl_coef(0.1, kl=12.0, target=6.0, n_answers=100, horizon=1000) == pytest.approx(0.1 * 1.02)
    assert adv.adapt_kl_coef(0.1, kl=1.0, target=6.0, n_answers=100, horizon=1000) == pytest.approx(0.1 * 0.98)


# ---------------------------------------------------------------------------------------------- the step

def tiny_model():
    return llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, scan_layers=False)


def rollout_rows(rng, prompts, answers, T, left_pad=0):
    """RolloutBatch rows of the given prompt and answer lengths, `left_pad` padding tokens before each, and
    garbage in every entry where the weights are 0."""
    N = len(prompts)
    seq = rng.integers(3, 64, (N, T)).astype(np.int32)
    segments = np.zeros((N, T), np.int32)
    weights = np.zeros((N, T), np.float32)
    for n, (p, a) in enumerate(zip(prompts, answers)):
        segments[n, left_pad:left_pad + p + a] = 1
        weights[n, left_pad + p - 1:left_pad + p + a - 1] = 1
    tokens = np.where(segments > 0, seq, 0)
    targets = np.concatenate([tokens[:, 1:], np.zeros((N, 1), np.int32)], 1)
    noise = lambda scale: np.where(weights > 0, rng.standard_normal((N, T)), scale).astype(np.float32)  # noqa
    return RolloutBatch(tokens, targets, segments, positions_from_segments(segments), weights,
                        -np.abs(noise(-1e3)), -np.abs(noise(1e3)), noise(1e3), noise(-1e3), noise(1e3),
                        np.full(N, 0.1, np.float32))


def shift(batch: RolloutBatch, by: int) -> RolloutBatch:
    """The same rows with `by` more padding tokens on the left (what fell off the right was padding)."""
    return RolloutBatch(*(np.roll(x, by, axis=1) for x in batch[:-1]), batch.kl_coef)


def test_prompt_and_padding_get_no_loss_and_the_padding_side_does_not_change_the_update():
    cfg = Config(task="rl", model=tiny_model(), rl=RLConfig(algorithm="ppo", kl_penalty="loss", entropy_coef=0.01))
    task = RL(cfg)
    model = PolicyAndValue(cfg.model)
    params = model.init(jax.random.key(0), *(jnp.zeros((1, 8), jnp.int32),) * 3)["params"]
    params["value"]["value_head"]["kernel"] = jnp.full((32,), 0.1)  # values that differ by position
    rng = np.random.default_rng(1)
    right = rollout_rows(rng, [3, 5, 2, 4], [6, 2, 5, 1], 16)
    left = shift(right, 3)
    assert not np.array_equal(left.inputs, right.inputs)
    loss_and_grad = jax.jit(jax.value_and_grad(lambda p, b: task.sums(None, p, b, {})["loss"]))
    (l_right, g_right), (l_left, g_left) = loss_and_grad(params, right), loss_and_grad(params, left)
    assert np.isfinite(float(l_right)) and abs(float(l_right)) > 1e-3
    np.testing.assert_allclose(float(l_left), float(l_right), rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g_left, g_right)
    # Garbage where the weights are 0 (prompt, padding) changes nothing: clean it and compare.
    clean = right._replace(**{k: np.where(right.weights > 0, getattr(right, k), 0.0).astype(np.float32)
                              for k in ("old_logprobs", "ref_logprobs", "advantages", "returns", "old_values")})
    np.testing.assert_allclose(float(loss_and_grad(params, clean)[0]), float(l_right), rtol=1e-6)


def test_a_value_model_on_a_constant_reward_converges_to_it():
    """The value part of the objective alone (the policy's log-probabilities held fixed), on returns of 1.5."""
    import optax
    from llm_jax.model import Transformer
    value_model = Transformer(tiny_model(), "value")
    params = value_model.init(jax.random.key(0), *(jnp.zeros((1, 8), jnp.int32),) * 3)["params"]
    batch = rollout_rows(np.random.default_rng(2), [3, 4, 2, 5], [5, 4, 6, 3], 12)
    batch = batch._replace(advantages=np.zeros_like(batch.advantages), returns=np.full_like(batch.returns, 1.5),
                           old_values=np.zeros_like(batch.old_values))
    values = lambda p: value_model.apply({"params": p}, batch.inputs, batch.positions, batch.segment_ids)  # noqa
    fixed = jnp.asarray(batch.old_logprobs)
    loss = lambda p: clipped_sums(fixed, 0 * fixed, values(p), batch, RLConfig(clip_value=1e3))["loss"]  # noqa
    opt = optax.adam(3e-2)

    @jax.jit
    def update(p, s):
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s
    state = opt.init(params)
    for _ in range(150):
        params, state = update(params, state)
    np.testing.assert_allclose(np.asarray(values(params))[batch.weights > 0], 1.5, atol=0.05)


def test_clipping_counts_and_the_value_clip():
    batch = rollout_rows(np.random.default_rng(3), [2, 2], [4, 4], 8)
    batch = batch._replace(old_logprobs=np.zeros_like(batch.old_logprobs), advantages=np.ones_like(batch.advantages),
                           old_values=np.zeros_like(batch.old_values), returns=np.full_like(batch.returns, 2.0))
    r = RLConfig(clip_ratio=0.2, clip_value=0.5)
    logp = jnp.where(batch.weights > 0, jnp.log(jnp.where(np.arange(8) % 2 == 0, 1.5, 1.1)), 0.0)
    sums = clipped_sums(logp, jnp.zeros_like(logp), jnp.full(logp.shape, 1.0), batch, r)
    tokens = float(batch.weights.sum())
    assert float(sums["clipped"]) == pytest.approx(float((batch.weights * (np.arange(8) % 2 == 0)).sum()))
    # Ratio 1.5 with A = 1 pays the clipped 1.2; ratio 1.1 pays itself. Values 1 move 1 from 0: clipped to 0.5.
    expected = -(batch.weights * np.where(np.arange(8) % 2 == 0, 1.2, 1.1)).sum()
    assert float(sums["policy_loss"]) == pytest.approx(expected, rel=1e-6)
    assert float(sums["value_clipped"]) == tokens
    assert float(sums["value_loss"]) == pytest.approx(0.5 * 1.5 ** 2 * tokens, rel=1e-6)


# ---------------------------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    """Prompts of different lengths, so rollout rows carry different amounts of padding."""
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    words = ["cat", "dog", "bird", "fish", "mouse"]
    path.write_text("".join(json.dumps({"prompt": "the " + " ".join(words[:1 + i % 5]) + f" {i}"}) + "\n"
                            for i in range(40)))
    return path


def rl_config(experiment, export, prompts, *sets):
    return resolve(apply_overrides(load_experiment(experiment), [
        f"checkpoint.init_from={export}", f"data.sources=prompts:{prompts}", "rl.value_init=policy",
        "rl.reward_model=count:270", *sets]))


def history(run_dir, scalars, tag):
    return [v for _, v in scalars(run_dir)[0][tag]]


def test_config_errors_name_the_key(tiny_export, prompts_file):
    base = load_experiment("grpo_tiny")
    cases = {("rl.samples_per_prompt=1",): "rl.samples_per_prompt=1",
             ("rl.prompts_per_rollout=3",): "train.batch_size=8",
             ("rl.max_answer_tokens=64",): "rl.max_answer_tokens=64",
             ("rl.reward_model=count:999",): "rl.reward_model=count:999",
             (f"rl.reward_model={tiny_export}",): "not a reward model",
             ("rl.reward_model=",): "rl.reward_model",
             ("rl.algorithm=ppo", "rl.value_init=reward_model"): "rl.value_init=policy",
             ("rl.temperature=0",): "rl.temperature=0",
             ("rl.top_p=0",): "rl.top_p=0",
             ("model.logits_chunk=64",): "model.logits_chunk=64",
             ("peft.method=lora", "peft.dropout=0.1"): "peft.dropout=0.1",
             ("model.dropout=0.1",): "model.dropout=0.1",
             ("checkpoint.init_from=",): "checkpoint.init_from"}
    for sets, message in cases.items():
        cfg = apply_overrides(base, [f"checkpoint.init_from={tiny_export}", f"data.sources=prompts:{prompts_file}",
                                     "rl.reward_model=count:270", "data.tokenizer=x.model", *sets])
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            make(cfg)


def rollouts(setup, steps: int, kl_coef: float | None = None, reward=None, with_steps: bool = False) -> list[dict]:
    """The scalars of each rollout of `steps` train steps of a built RL setup from its initial state (copied, so
    several runs start alike); kl_coef replaces β, reward the reward function. with_steps: every step's
    metrics too, one dict per step (with its rollout's scalars where a rollout was made)."""
    from llm_jax.parallel import sharding
    from llm_jax.train import peft, step
    source = setup.task.train_source(setup.data, 0, 1)
    source.kl_coef = source.kl_coef if kl_coef is None else kl_coef
    state = jax.tree.map(jnp.copy, setup.state)
    whole = lambda s: s.replace(params=peft.with_base(s.params, setup.frozen))  # as the loop hands it  # noqa: E731
    engine = setup.task.engine(whole(state).params)
    default_reward = engine.reward
    engine.reward = reward or default_reward
    shardings, out = step.batch_shardings(setup.mesh, setup.task, microbatched=True), []
    for _ in range(steps):
        local = source.next_batch(whole(state))
        made = source.scalars()
        state, metrics = setup.train_fn(state, sharding.global_batch(local, shardings), setup.frozen)
        if with_steps:
            out.append({**made, **{k: float(v) for k, v in metrics.items()}})
        elif made:
            out.append(made)
    engine.reward = default_reward
    return out


@pytest.mark.slow
def test_a_planted_reward_rises_with_ppo_grpo_and_rloo_and_ppo_is_the_same_on_a_mesh(tmp_path, tiny_export,
                                                                                      prompts_file):
    """count:270 rewards one token; each algorithm raises its mean score over 24 steps (6 rollouts); GRPO
    without the KL leash (β=0) rises faster than with a heavy one (β=2), whose KL stays small; negated (the
    reward is minus the count of "the", token 265), the counted token becomes rarer. On a 2×2×2 mesh, rollouts
    seeded identically sample the same answers as on one device, and PPO's figures over two rollouts and the 8
    updates on them agree to 2e-5."""
    from llm_jax.train.setup import build
    sets = ("optim.learning_rate=3e-3", "train.steps=24")
    runs = {"ppo": ("ppo_tiny",), "grpo": ("grpo_tiny",), "rloo": ("grpo_tiny", "rl.algorithm=rloo"),
            "ppo_mesh": ("ppo_tiny", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")}
    setups = {name: build(rl_config(experiment, tiny_export, prompts_file, *sets, *more), tmp_path / name,
                          None if name.endswith("mesh") else jax.devices()[:1])
              for name, (experiment, *more) in runs.items()}
    for one, mesh in zip(rollouts(setups["ppo"], 8, with_steps=True), rollouts(setups["ppo_mesh"], 8, with_steps=True)):
        assert one.keys() == mesh.keys()
        for tag in one:
            if not tag.startswith("perf/"):
                np.testing.assert_allclose(mesh[tag], one[tag], rtol=2e-5, atol=2e-5, err_msg=tag)
    runs = {"ppo": rollouts(setups["ppo"], 24), "grpo": rollouts(setups["grpo"], 24, kl_coef=0.0),
            "rloo": rollouts(setups["rloo"], 24), "grpo_heavy": rollouts(setups["grpo"], 24, kl_coef=2.0)}
    gain = {name: np.mean([r["rl/score_mean"] for r in rs[-2:]]) - np.mean([r["rl/score_mean"] for r in rs[:2]])
            for name, rs in runs.items()}
    kl = {name: rs[-1]["rl/kl"] for name, rs in runs.items()}
    assert all(gain[name] > 0.5 for name in ("ppo", "grpo", "rloo")), gain  # from about 0.4 per answer
    assert gain["grpo"] > 2 * gain["grpo_heavy"] and kl["grpo_heavy"] < 0.2 * kl["grpo"], (gain, kl)
    negated = rollouts(setups["grpo"], 24, reward=lambda p, k, answers, t: -np.array(
        [a.count(265) for a in answers], np.float32))
    count = -np.array([r["rl/score_mean"] for r in negated])
    assert np.mean(count[-2:]) < 0.5 * np.mean(count[:2]), count


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, tiny_export):
    """A reward model trained briefly from the tiny export on planted pairs (a run directory, not an export)."""
    root = tmp_path_factory.mktemp("rm")
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"the cat {i}", "chosen": "the cat sees the dog.",
                                         "rejected": "fish fish fish"}) + "\n" for i in range(40)))
    assert main(["train", "--config", "rm_tiny", "--run-dir", str(root / "run"), *set_flags((
        f"checkpoint.init_from={tiny_export}", f"data.sources=pairs:{pairs}", "train.steps=10",
        "train.eval_every=10", "train.batch_size=8"))]) == 0
    return root / "run"


@pytest.mark.slow
def test_ppo_from_a_reward_model_first_minibatch_frozen_models_and_scores(tmp_path, tiny_export, prompts_file,
                                                                           reward_run):
    """The value model starts from the reward model's trunk; the first minibatch has ratio 1, no clipping and
    KL 0 to the reference (the initial policy) with every estimator, whatever the prompts' padding; the
    reference and the reward model are bitwise unchanged by training; rollout scores are `llm-jax score`'s."""
    from llm_jax.inference.score import score_file
    from llm_jax.parallel import sharding
    from llm_jax.train import step
    from llm_jax.train.export import load_for_inference
    from llm_jax.train.setup import build
    cfg = rl_config("ppo_tiny", tiny_export, prompts_file, f"rl.reward_model={reward_run}",
                    "rl.value_init=reward_model")
    s = build(cfg, tmp_path / "run", jax.devices()[:1])
    rm_params = load_for_inference(reward_run)[1]
    np.testing.assert_array_equal(s.state.params["value"]["embed"]["embedding"], rm_params["embed"]["embedding"])
    assert not np.any(np.asarray(s.state.params["value"]["value_head"]["kernel"]))  # a fresh head: values start at 0
    source = s.task.train_source(s.data, 0, 1)
    shardings = step.batch_shardings(s.mesh, s.task, microbatched=True)
    local = source.next_batch(s.state)
    stats, buffer = source.scalars(), source.buffer
    assert stats["rl/kl"] == 0.0 and len(set(buffer.weights.argmax(1).tolist())) > 1  # prompts of several lengths
    for estimator in ("k1", "k2", "k3"):  # the policy is the reference: every estimator is exactly 0
        assert np.all(adv.kl_estimate(buffer.old_logprobs, buffer.ref_logprobs, estimator) == 0), estimator
    engine = s.task.engine(s.state.params)
    reference = jax.tree.map(np.array, engine.reference)
    state, metrics = s.train_fn(s.state, sharding.global_batch(local, shardings), s.frozen)
    m = {k: float(v) for k, v in metrics.items()}
    # The differentiated pass rounds differently from the rollout's plain one: 1 to float32 noise.
    assert m["ppo/ratio_mean"] == pytest.approx(1.0, abs=1e-6) and m["ppo/clip_fraction"] == 0.0
    assert abs(m["ppo/approx_kl"]) < 1e-10 and abs(m["rl/kl_to_reference"]) < 1e-6
    for _ in range(5):  # into the second rollout
        state, metrics = s.train_fn(state, sharding.global_batch(source.next_batch(state), shardings), s.frozen)
    assert source.rollout == 1 and float(metrics["ppo/approx_kl"]) > 0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, engine.reference), reference)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, engine.reward.params), rm_params)
    # The rollout's scores are `llm-jax score`'s normalised rewards of the same (prompt, answer).
    prompts = source.rollout_prompts(0)[:2]
    answers = [[270, 283, 3], [265, 267, 302, 3]]
    texts = [s.data.tokenizer.decode(a[:-1]).strip() for a in answers]
    got = engine.reward(prompts, 1, answers, texts)
    lines = tmp_path / "answers.jsonl"
    lines.write_text("".join(json.dumps({"prompt": p[0].content, "response": t}) + "\n"
                             for p, t in zip(prompts, texts)))
    score_file(reward_run, lines, tmp_path / "scores.jsonl")
    expected = [json.loads(line)["reward"] for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.slow
def test_grpo_with_lora_reads_its_reference_from_the_frozen_base(tmp_path, tiny_export, prompts_file):
    """With peft.method=lora the reference is the frozen base itself (the same arrays, read without the
    adapters): the first rollout's KL is exactly 0, training moves the adapters and never the base."""
    from llm_jax.train import peft
    from llm_jax.train.setup import build
    s = build(rl_config("grpo_tiny", tiny_export, prompts_file, "peft.method=lora", "peft.rank=4"), tmp_path / "run",
              jax.devices()[:1])
    base = jax.tree.map(np.array, s.frozen)
    steps = rollouts(s, 8, with_steps=True)
    assert steps[0]["rl/kl"] == 0.0 and steps[-1]["rl/kl_to_reference"] > 0
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, s.frozen), base)
    engine = s.task.engine(None)  # made by the rollouts
    assert all(a is b for a, b in zip(jax.tree.leaves(engine.reference), jax.tree.leaves(s.frozen[peft.BASE])))
