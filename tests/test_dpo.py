"""DPO and IPO (tasks/dpo.py): the losses against hand computations, the rows it reads, step 0, the bandit
whose optimum is known in closed form, a planted preference end to end, and mesh equivalence."""
import dataclasses
import json
import math
import random

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from conftest import set_flags
from llm_jax import tasks
from llm_jax.cli.main import main
from llm_jax.config import Config, DPOConfig, MeshConfig, llama
from llm_jax.data.batches import PairTokenBatch, positions_from_segments, split_microbatches
from llm_jax.data.chat.dialogue import Message
from llm_jax.data.chat.preference import PreparedAnswerPairs, render_pair
from llm_jax.data.chat.pairs import Pair
from llm_jax.errors import ConfigError
from llm_jax.experiment import apply_overrides, load_experiment, resolve
from llm_jax.inference.generate import Generator, Sampling
from llm_jax.inference.runner import ModelRunner
from llm_jax.model import Transformer
from llm_jax.parallel import sharding
from llm_jax.tasks.dpo import DPO, pair_sums, scalars
from llm_jax.train import optim, step
from llm_jax.train.export import load_for_inference
from llm_jax.train.state import abstract_state, create_state

LN2 = math.log(2)


def model_cfg(**overrides):
    return llama(**{"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64,
                    "scan_layers": False, **overrides})


def random_pairs(rng, P, T, vocab=64):
    """P pairs of ragged answers after prompts of 2..4 tokens, some padding pairs among them."""
    lengths = rng.integers(T // 2, T + 1, (P, 2))
    prompt = rng.integers(2, 5, P)
    segment_ids = (np.arange(T)[None, None] < lengths[..., None]).astype(np.int32)
    tokens = rng.integers(3, vocab, (P, 2, T)).astype(np.int32) * segment_ids
    tokens[:, 1, :4] = tokens[:, 0, :4]  # the prompt is shared
    targets = np.concatenate([tokens[..., 1:], np.zeros((P, 2, 1), np.int32)], -1)
    index = np.arange(T)
    weights = ((index[None, None] + 1 >= prompt[:, None, None]) & (index[None, None] + 1 < lengths[..., None]))
    return PairTokenBatch(inputs=tokens, targets=targets, segment_ids=segment_ids,
                          positions=positions_from_segments(segment_ids), weights=weights.astype(np.float32),
                          target_bytes=rng.integers(1, 4, (P, 2, T)).astype(np.int32),
                          valid=(rng.random(P) < 0.8).astype(np.float32))


# ---------------------------------------------------------------------------------------------- the losses

def hand_dpo(nats, ref_nats, batch, beta, loss, eps):
    """The loss per valid pair, written out with Python floats, one pair and one token at a time."""
    out = []
    for p in range(len(batch.valid)):
        if not batch.valid[p]:
            continue
        logp = [-sum(float(nats[p, j, t]) for t in range(nats.shape[-1]) if batch.weights[p, j, t])
                for j in (0, 1)]
        ref = [-sum(float(ref_nats[p, j, t]) for t in range(nats.shape[-1]) if batch.weights[p, j, t])
               for j in (0, 1)]
        h = (logp[0] - ref[0]) - (logp[1] - ref[1])
        sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        out.append(-(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h)) if loss == "sigmoid"
                   else (h - 1 / (2 * beta)) ** 2)
    return out


@pytest.mark.parametrize("loss, beta, eps", [("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("ipo", 0.3, 0.0)])
def test_losses_equal_a_hand_computation_with_prompt_and_padding_masked(loss, beta, eps):
    rng = np.random.default_rng(1)
    batch = random_pairs(rng, 6, 10)
    nats, ref_nats = rng.random((6, 2, 10)) * 3, rng.random((6, 2, 10)) * 3
    # What the prompt and the padding hold must not matter: make it huge there.
    nats = np.where(batch.weights > 0, nats, 1e3).astype(np.float32)
    ref_nats = np.where(batch.weights > 0, ref_nats, -1e3).astype(np.float32)
    sums = pair_sums(jnp.asarray(nats), jnp.asarray(ref_nats), jnp.zeros_like(nats), batch, beta, loss, eps)
    assert 0 < float(sums["correct"]) < float(sums["pairs"])
    expected = hand_dpo(nats, ref_nats, batch, beta, loss, eps)
    assert float(sums["pairs"]) == len(expected) > 0
    np.testing.assert_allclose(float(sums["loss"]), sum(expected), rtol=1e-5)
    # β enters once: the implicit rewards are β·(log π − log ref), the margin their difference.
    logp = -(nats * batch.weights).sum(-1) + (ref_nats * batch.weights).sum(-1)
    v = batch.valid
    np.testing.assert_allclose(float(sums["chosen"]), beta * float((v * logp[:, 0]).sum()), rtol=1e-5)
    np.testing.assert_allclose(float(sums["margin"]), beta * float((v * (logp[:, 0] - logp[:, 1])).sum()), rtol=1e-5)
    if loss == "sigmoid" and eps == 0:
        np.testing.assert_allclose(float(sums["nats"]), float(sums["loss"]), rtol=1e-6)


def test_per_token_scalars_are_in_bits_and_count_answer_tokens_only():
    rng = np.random.default_rng(2)
    batch = random_pairs(rng, 5, 8)
    nats = jnp.full((5, 2, 8), 2 * LN2)  # 2 bits per token everywhere
    kl = jnp.full((5, 2, 8), 0.5 * LN2)
    out = scalars(pair_sums(nats, nats, kl, batch, 0.1, "sigmoid", 0.0), "eval")
    chosen_w = batch.weights[:, 0] * batch.valid[:, None]
    assert out["eval/logp_chosen"] == pytest.approx(-2.0) and out["eval/logp_rejected"] == pytest.approx(-2.0)
    assert out["eval/kl_to_reference"] == pytest.approx(0.5)
    assert out["eval/chosen_bits_per_byte"] == pytest.approx(
        2.0 * chosen_w.sum() / (chosen_w * batch.target_bytes[:, 0]).sum())


def test_at_step_0_the_policy_is_the_reference_one_bit_per_pair_no_margin_no_accuracy():
    model = Transformer(model_cfg())
    params = model.init(jax.random.key(0), *(jnp.zeros((1, 8), jnp.int32),) * 3)["params"]
    batch = random_pairs(np.random.default_rng(3), 6, 12)
    task = DPO(Config(task="dpo", dpo=DPOConfig(beta=0.1, label_smoothing=0.1)))
    out = scalars(jax.jit(lambda p, b: task.sums(model, p, b, {"reference": p}))(params, batch), "train")
    assert out["train/loss_bits_per_pair"] == pytest.approx(1.0, abs=1e-6)
    for tag in ("margin", "reward_chosen", "reward_rejected", "accuracy", "kl_to_reference"):
        assert float(out[f"train/{tag}"]) == 0.0, tag  # accuracy counts strictly greater implicit rewards
    assert float(out["train/logp_chosen"]) < 0
    # In the train step the policy's differentiated pass rounds differently: h of float32 noise (seen on
    # pretrain_en_small: margin 1e-6, 56% "accuracy" at step 0 when counted strictly) is not a preference.
    nats = jnp.asarray(np.random.default_rng(5).random((6, 2, 12)) * 5, jnp.float32)
    noisy = nats * (1 + 1e-7 * jnp.asarray(np.random.default_rng(6).standard_normal(nats.shape), jnp.float32))
    assert float(pair_sums(noisy, nats, 0 * nats, batch, 0.1, "sigmoid", 0.0)["correct"]) == 0
    chosen_better = nats.at[:, 0].multiply(0.999)  # a real preference, 0.1% of the log-probability
    sums = pair_sums(chosen_better, nats, 0 * nats, batch, 0.1, "sigmoid", 0.0)
    assert float(sums["correct"]) == float(sums["pairs"]) > 0


# ---------------------------------------------------------------------------------------------- the rows

def test_rows_weight_exactly_the_answers_and_their_end(tmp_path, tiny_export):
    from llm_jax.data.tokenizer import Tokenizer
    tok = Tokenizer.load(tiny_export / "tokenizer.model")
    words = ("yes", "no", "maybe")
    pairs = [{"prompt": f"Say {w}.", "chosen": f"{w}!", "rejected": f"not {w}"} for w in words] * 4
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = resolve(apply_overrides(load_experiment("dpo_tiny"), [f"checkpoint.init_from={tiny_export}",
                                                                f"data.sources=pairs:{tmp_path}/pairs.jsonl"]))
    task = tasks.make(cfg)
    task.prepare(tmp_path / "data")
    data = task.load(tmp_path / "data")
    assert isinstance(data, PreparedAnswerPairs)
    end, rows = tok.specials["<|end|>"], task.rows(data, "train")
    assert len(rows) == data.meta["splits"]["train"]["pairs"] > 0
    for i in range(len(rows)):
        row = rows[i]
        assert isinstance(row, PairTokenBatch) and row.inputs.shape == (2, cfg.data.seq_len)
        answers = []
        for j in (0, 1):
            weighted = row.weights[j] > 0
            answer = row.targets[j][weighted]
            assert answer[-1] == end and not weighted[-1]  # the end of the turn counts; the last slot has no target
            np.testing.assert_array_equal(row.inputs[j][1:][weighted[:-1]], answer)  # targets are the next inputs
            answers.append(tok.decode(answer[:-1].tolist()))
            assert row.target_bytes[j][weighted].sum() == len(answers[-1].encode())
        word = answers[0].rstrip("!")
        assert word in words and answers == [f"{word}!", f"not {word}"]
        chosen, _ = render_pair(Pair((Message("user", f"Say {word}."),), f"{word}!", f"not {word}", 0.0), tok,
                                cfg.data.seq_len)
        np.testing.assert_array_equal(row.inputs[0][:len(chosen)], chosen)  # the prompt is the rendered one
        assert row.segment_ids[0].sum() == len(chosen)


def test_dpo_needs_an_export_and_a_language_model_reference(tmp_path, tiny_export, capsys):
    cfg = load_experiment("dpo_tiny")
    with pytest.raises(ConfigError, match="task=dpo trains a policy from an export: set checkpoint.init_from"):
        tasks.make(apply_overrides(cfg, ["data.tokenizer=t.model"]))
    with pytest.raises(ConfigError, match="task=dpo reads hh, pairs, qa_feedback sources, not 'chat'"):
        tasks.make(apply_overrides(cfg, ["data.sources=chat:d.jsonl", f"checkpoint.init_from={tiny_export}"]))
    with pytest.raises(ConfigError, match=r"dpo.beta=0.0 must be positive"):
        resolve(apply_overrides(cfg, ["dpo.beta=0", f"checkpoint.init_from={tiny_export}"]))
    with pytest.raises(ConfigError, match=r"model.dropout=0.1: task=dpo's reference would drop out"):
        tasks.make(resolve(apply_overrides(cfg, ["model.dropout=0.1", f"checkpoint.init_from={tiny_export}"])))
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n")
    argv = ["train", "--config", "dpo_tiny", "--run-dir", str(tmp_path / "run"),
            *set_flags([f"checkpoint.init_from={tiny_export}", f"data.sources=pairs:{tmp_path}/pairs.jsonl",
                        f"dpo.reference={tmp_path}"])]
    assert main(argv) == 2
    assert f"dpo.reference={tmp_path}: not an export directory" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing left behind


# ---------------------------------------------------------------------------------------------- the bandit

@pytest.mark.slow
def test_a_bandit_converges_to_the_closed_form_optimum():
    """One prompt, K one-token answers, comparisons in the proportions of a Bradley-Terry reward r: DPO's
    optimum is π(y) ∝ π_ref(y) exp(r(y)/β) over the K answers."""
    K, beta, copies, STEPS = 4, 0.5, 20, 80
    r = np.array([1.0, 0.0, -0.5, 0.4])
    answers, prompt, end = np.arange(10, 10 + K), [5, 6, 7], 4
    rows = []
    for i in range(K):
        for j in range(i + 1, K):
            n_i = round(copies / (1 + math.exp(-(r[i] - r[j]))))  # times i is preferred to j
            rows += [(i, j)] * n_i + [(j, i)] * (copies - n_i)
    P, T = len(rows), 6
    seq = lambda a: prompt + [int(answers[a]), end, 0]  # noqa: E731
    tokens = np.array([[seq(c), seq(w)] for c, w in rows], np.int32)
    segment_ids = (np.arange(T) < 5).astype(np.int32) * np.ones((P, 2, 1), np.int32)
    weights = np.zeros((P, 2, T), np.float32)
    weights[..., 2:4] = 1  # targets: the answer token and the end of the turn
    batch = PairTokenBatch(inputs=tokens, targets=np.concatenate([tokens[..., 1:], 0 * tokens[..., :1]], -1),
                           segment_ids=segment_ids, positions=positions_from_segments(segment_ids), weights=weights,
                           target_bytes=np.ones_like(tokens), valid=np.ones(P, np.float32))
    model = Transformer(model_cfg())
    ref = model.init(jax.random.key(0), *(jnp.zeros((1, T), jnp.int32),) * 3)["params"]
    ref_copy = jax.tree.map(np.array, ref)
    task = DPO(Config(task="dpo", dpo=DPOConfig(beta=beta)))
    opt = optax.adam(3e-2)

    def update(carry, _):
        params, opt_state = carry
        grads = jax.grad(lambda p: task.sums(model, p, batch, {"reference": ref})["loss"] / P)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return (optax.apply_updates(params, updates), opt_state), None

    train = jax.jit(lambda params: jax.lax.scan(update, (params, opt.init(params)), length=STEPS)[0][0])

    answer_logp = jax.jit(lambda p, b: task.sums(model, p, b, {"reference": p})["logp_chosen"])

    def answer_probs(params):
        pair_rows = PairTokenBatch(*(x[:1] for x in batch))
        logp = {}
        for a in range(K):
            t = np.array([[seq(a), seq(a)]], np.int32)
            b = pair_rows._replace(inputs=t, targets=np.concatenate([t[..., 1:], 0 * t[..., :1]], -1))
            logp[a] = float(answer_logp(params, b))
        lp = np.array([logp[a] for a in range(K)])
        return np.exp(lp - np.logaddexp.reduce(lp))

    params = train(ref)
    pi_ref = answer_probs(ref)
    target = pi_ref * np.exp(r / beta)
    target /= target.sum()
    pi = answer_probs(params)
    kl = float(np.sum(pi * np.log(pi / target)))
    assert kl < 0.02, (kl, pi, target)
    assert float(np.sum(pi_ref * np.log(pi_ref / target))) > 0.3  # it had far to go
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, ref), ref_copy)  # the reference never moved


# ---------------------------------------------------------------------------------------------- mesh

def dpo_train(mesh_cfg, devices=None, microbatches=1, steps=3, reference_seed=1):
    """A few DPO steps through the jitted train step on random pairs; the reference another init (the policy's
    own with reference_seed=0)."""
    cfg = model_cfg(n_heads=8, n_kv_heads=4, head_dim=8)
    mesh = sharding.make_mesh(mesh_cfg, devices)
    model = Transformer(cfg)
    ocfg = dataclasses.replace(Config().optim, learning_rate=1e-2, warmup_steps=1)
    optimizer = optim.make_optimizer(ocfg)
    task = DPO(Config(task="dpo", dpo=DPOConfig(beta=0.5, label_smoothing=0.1)))
    layout = abstract_state(model, optimizer, mesh, 16)
    state, shardings = create_state(model, optimizer, layout, 16, jax.random.key(0))
    reference = create_state(model, optimizer, layout, 16, jax.random.key(reference_seed))[0].params
    before = jax.tree.map(np.array, reference)
    train_fn = step.jit_train_step(model, optimizer, ocfg, mesh, shardings, task, {"reference": shardings.params})
    rng, history = np.random.default_rng(0), []
    for _ in range(steps):
        batch = split_microbatches(microbatches, random_pairs(rng, 8, 16))
        state, metrics = train_fn(state, sharding.global_batch(batch, step.batch_shardings(mesh, task, True)),
                                  {"reference": reference})
        history.append({k: float(v) for k, v in metrics.items()})
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, reference), before)  # bitwise, not donated
    return history


@pytest.mark.slow
def test_the_train_step_starts_at_one_bit_per_pair_when_the_policy_is_the_reference():
    """The differentiated forward pass rounds differently from the reference's plain one: the first step's
    figures are the reference's to float32 noise, and that noise is no preference (accuracy 0)."""
    first = dpo_train(MeshConfig(1, 1, 1), jax.devices()[:1], steps=1, reference_seed=0)[0]
    assert first["train/loss_bits_per_pair"] == pytest.approx(1.0, abs=1e-6) and first["train/accuracy"] == 0.0
    assert abs(first["train/margin"]) < 1e-5 and first["train/kl_to_reference"] < 1e-6


@pytest.mark.slow
def test_dpo_training_is_the_same_on_one_device_on_a_mesh_and_with_microbatches():
    reference = dpo_train(MeshConfig(1, 1, 1), jax.devices()[:1])
    assert reference[0]["train/loss_bits_per_pair"] > 0.5 and reference[-1]["train/accuracy"] > 0
    for mesh_cfg, micro in ((MeshConfig(2, 2, 2), 2),):
        got = dpo_train(mesh_cfg, microbatches=micro)
        for r, g in zip(reference, got):
            for k in r:
                np.testing.assert_allclose(g[k], r[k], rtol=2e-5, atol=2e-5, err_msg=f"{mesh_cfg} {micro} {k}")


# ---------------------------------------------------------------------------------------------- end to end

POLITE, RUDE = "Thank you kindly.", "Go away now."
WORDS = ["river", "stone", "light", "garden", "winter", "bread", "music", "harbor", "forest", "candle"]


def question(rng):
    return "Tell me about the " + " ".join(rng.choices(WORDS, k=2)) + "."


def polite_share(run_or_export, prompts):
    cfg, params, tok = load_for_inference(run_or_export)
    from llm_jax.data.chat.template import render_prompt
    gen = Generator(ModelRunner(cfg.model, params), Sampling(temperature=0))
    end = tok.specials["<|end|>"]
    answers = gen.generate([render_prompt([Message("user", q)], tok).tolist() for q in prompts], 24,
                           stop_ids=[end, tok.eos_id])
    texts = [tok.decode([t for t in a if t not in (end, tok.eos_id)]).strip() for a in answers]
    return sum(t.endswith(POLITE) for t in texts) / len(texts), texts


@pytest.mark.slow
def test_a_planted_preference_moves_greedy_answers_and_keeps_the_language_model(tmp_path, tiny_export, scalars):
    """SFT teaches answers that end rudely 9 times in 10; DPO on pairs that prefer the polite ending makes
    greedy answers to new prompts end politely, and the chosen answers' bits per byte do not blow up."""
    rng = random.Random(0)
    dialogues, pairs_ = [], []
    for i in range(200):
        q, body = question(rng), "Sure."
        ending = POLITE if i % 10 == 0 else RUDE
        dialogues.append({"messages": [{"role": "user", "content": q},
                                       {"role": "assistant", "content": f"{body} {ending}"}]})
        pairs_.append({"prompt": q, "chosen": f"{body} {POLITE}", "rejected": f"{body} {RUDE}"})
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(d) + "\n" for d in dialogues))
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs_))
    new_prompts = [question(random.Random(100 + i)) for i in range(20)]
    sft, dpo = tmp_path / "sft", tmp_path / "dpo"
    assert main(["train", "--config", "sft_tiny", "--run-dir", str(sft),
                 *set_flags([f"data.sources=chat:{tmp_path}/d.jsonl", f"checkpoint.init_from={tiny_export}",
                             "train.steps=150", "train.eval_every=1000"])]) == 0
    assert main(["export", "--run-dir", str(sft), "--out", str(tmp_path / "sft-export")]) == 0
    before, texts = polite_share(tmp_path / "sft-export", new_prompts)
    assert before < 0.1 and sum(t.endswith(RUDE) for t in texts) > 10, texts
    assert main(["train", "--config", "dpo_tiny", "--run-dir", str(dpo),
                 *set_flags([f"data.sources=pairs:{tmp_path}/p.jsonl", f"checkpoint.init_from={tmp_path}/sft-export",
                             "train.steps=40", "train.eval_every=20"])]) == 0
    after, texts = polite_share(dpo, new_prompts)
    assert after > 0.8, texts
    curves = scalars(dpo)[0]
    first, last = curves["eval/chosen_bits_per_byte"][0][1], curves["eval/chosen_bits_per_byte"][-1][1]
    assert last - first < 0.2, (first, last)  # at 10x the learning rate: +1.9 bits/byte, and noise for answers
    assert curves["eval/accuracy"][-1][1] > 0.9 and curves["train/loss_bits_per_pair"][0][1] == pytest.approx(1.0)


@pytest.mark.slow
def test_vocabulary_chunks_give_the_same_log_probabilities_and_kl():
    """model.logits_chunk never holds (B, T, V) logits; the nats of both models and the KL must not change."""
    from llm_jax.data.batches import TokenBatch
    from llm_jax.tasks.losses import next_token_nats_and_kl
    batch = random_pairs(np.random.default_rng(4), 3, 12)
    flat = TokenBatch(*(x.reshape(6, 12) for x in batch[:6]))
    plain, chunked = Transformer(model_cfg()), Transformer(model_cfg(logits_chunk=16))
    init = lambda seed: nn.meta.unbox(plain.init(jax.random.key(seed), *(jnp.zeros((1, 12), jnp.int32),) * 3))["params"]  # noqa: E731
    params, ref = init(0), jax.tree.map(lambda x: x * 3.0, init(1))
    expected = next_token_nats_and_kl(plain, params, ref, flat)
    got = next_token_nats_and_kl(chunked, params, ref, flat)
    assert float(expected[2].mean()) > 0.01  # the two models differ
    for e, g, name in zip(expected, got, ("nats", "reference nats", "kl")):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5, err_msg=name)
