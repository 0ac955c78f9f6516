"""`llm-jax compare`: the held-out prompts are the reward model's eval split; a policy against itself is all
ties with no KL; against another, the KL equals a hand computation from both models' log-probabilities and the
win rate follows the judge's per-prompt rewards; bad input is one line and exit 2. The models are tiny random
exports made here (no training): two policies sharing a tokenizer, a judge with a tokenizer of its own."""
import json
import random
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from llm_jax import tasks
from llm_jax.cli.main import main
from llm_jax.config import Config, DataConfig, llama, to_json
from llm_jax.data.chat.pairs import iter_pair_groups
from llm_jax.data.chat.prepared import split_indices
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.inference import compare as cmp
from llm_jax.inference.generate import Sampling
from llm_jax.inference.runner import ModelRunner

WORDS = "the cat dog bird fish mouse sees chases likes eats river stone".split()
FLAGS = ("--samples", "5", "--max-tokens", "6", "--batch-size", "8", "--eval-fraction", "0.2")
SOURCES = "pairs:pairs.jsonl,hh:hh.jsonl"
EVAL = {"eval/reward_mean": 0.25, "eval/reward_std": 2.0}


def pairs(n, seed):
    rng = random.Random(seed)
    return [{"prompt": f"the {rng.choice(WORDS)} {rng.choice(WORDS)} the {rng.choice(WORDS)} {i}",
             "chosen": f"the {rng.choice(WORDS)} likes the fish.", "rejected": f"the {rng.choice(WORDS)} eats."}
            for i in range(n)]


def hh(n, seed):
    rng = random.Random(seed)
    questions = [f"\n\nHuman: where is the {rng.choice(WORDS)} {i}?\n\nAssistant:" for i in range(n)]
    return [{"chosen": f"{q} by the river.", "rejected": f"{q} no."} for q in questions]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare_data")
    write_jsonl(root / "pairs.jsonl", pairs(30, 0) + [{"prompt": "x", "chosen": "same", "rejected": "same"}])
    write_jsonl(root / "hh.jsonl", hh(10, 1))
    return root


def make_export(out, task, seed, tokenizer, eval_stats=None, scale=1.0):
    """An `llm-jax export` directory of a tiny model with random params (the reward head's too), times `scale`."""
    model = llama(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, scan_layers=False,
                  compute_dtype="float32", reward_init_std=0.5)
    cfg = Config(task=task, model=model, data=DataConfig(sources=("pairs:pairs.jsonl",), seq_len=32))
    dummy = jnp.zeros((1, 8), jnp.int32)
    params = nn.unbox(jax.jit(tasks.model_of(cfg).init)(jax.random.key(seed), dummy, dummy, dummy + 1))["params"]
    params = jax.tree.map(lambda x: x * scale, params)
    out.mkdir(parents=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((out / "params").absolute(), params)
    (out / "config.json").write_text(to_json(cfg))
    shutil.copy(tokenizer, out / "tokenizer.model")
    if eval_stats:
        (out / "eval.json").write_text(json.dumps(eval_stats))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(policy, other policy, judge): the policies share a tokenizer, the judge reads answers with its own."""
    root = tmp_path_factory.mktemp("models")
    train_tokenizer([" ".join(WORDS) + ". where is by no ?\n"] * 20, root / "lm_tok", 320)
    train_tokenizer(["a reward model reads its own pieces: " + " ".join(WORDS[::-1]) + "\n"] * 20, root / "rm_tok", 320)
    return (make_export(root / "policy", "pretrain", 0, root / "lm_tok.model"),
            make_export(root / "other", "pretrain", 1, root / "lm_tok.model", scale=3.0),  # sharper
            make_export(root / "judge", "reward", 2, root / "rm_tok.model", EVAL))


def run(capsys, *argv):
    code = main(["compare", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_prompts_are_the_held_out_groups_of_each_source_in_order(data):
    sources = ("pairs:pairs.jsonl", "hh:hh.jsonl")
    prompts = cmp.held_out_prompts(sources, data, 0.2, 100)
    groups = {s: [] for s in sources}
    for source, group in iter_pair_groups(sources, data):
        groups[source].append(group[0].prompt)
    expected = [groups[s][i] for s in sources for i in split_indices(len(groups[s]), 0.2)["eval"]]
    assert prompts == expected and len(prompts) == 6 + 2  # 30 usable pairs (one skipped), then 10
    train = {groups[s][i] for s in sources for i in split_indices(len(groups[s]), 0.2)["train"]}
    assert not train & set(prompts)  # really held out
    assert cmp.held_out_prompts(sources, data, 0.2, 3) == expected[:3]


def test_win_rate_counts_ties_half_and_the_bootstrap_interval_holds_the_mean():
    scores = cmp.wins(np.array([1.0, 2.0, 3.0, 5.0]), np.array([0.0, 2.0, 4.0, 5.0]),
                      np.array([False, False, False, True]))
    assert scores.tolist() == [1.0, 0.5, 0.0, 0.5]
    lo, hi = cmp.bootstrap_ci(scores)
    assert 0.0 <= lo < scores.mean() < hi <= 1.0
    assert cmp.bootstrap_ci(scores) == (lo, hi)  # a fixed seed
    assert cmp.bootstrap_ci(np.full(7, 0.5)) == (0.5, 0.5)
    assert cmp.kl_warning(Sampling()) is None and "temperature=0.7" in cmp.kl_warning(Sampling(temperature=0.7))


@pytest.mark.slow
def test_a_policy_against_itself_ties_everywhere_with_no_kl(models, data, tmp_path, capsys):
    policy, _, judge = models
    code, out, err = run(capsys, "--policy", str(policy), "--baseline", str(policy), "--judge", str(judge),
                         "--prompts", SOURCES, "--data-dir", str(data), *FLAGS, "--json",
                         "--out", str(tmp_path / "answers.jsonl"))
    assert code == 0, err
    assert not err  # temperature 1, no top-k/top-p: no warning
    s = json.loads(out)
    assert set(s) == {"n", "win_rate", "win_rate_ci", "ties", "reward_policy", "reward_baseline", "length_policy",
                      "length_baseline", "kl_nats_per_answer", "kl_nats_per_token", "settings"}
    assert s["n"] == 5 and s["ties"] == 5 and s["win_rate"] == 0.5 and s["win_rate_ci"] == [0.5, 0.5]
    assert s["kl_nats_per_answer"] == 0.0 and s["kl_nats_per_token"] == 0.0
    assert s["reward_policy"] == s["reward_baseline"] and s["length_policy"] == s["length_baseline"]
    assert 1 <= s["length_policy"] <= 6
    assert s["settings"]["rewards"] == "normalised by the judge's eval mean +0.2500 and std 2.0000"
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all(set(r) == set(cmp.OUT_KEYS) for r in rows)
    assert all(r["answer_policy"] == r["answer_baseline"] and r["answer_policy"] for r in rows)
    assert [r["prompt"] for r in rows] == [p[0].content for p in cmp.held_out_prompts(SOURCES.split(","), data, 0.2, 5)]
    assert np.mean([r["reward_policy"] for r in rows]) == pytest.approx(s["reward_policy"])
    assert len({r["reward_policy"] for r in rows}) > 1  # the judge tells the answers apart


def hand_nats(path, rows):
    """-log p(answer | prompt) of each row's policy answer, from the model's logits by hand in float64 (the rows
    right-padded: a causal model's logits at a position do not see what follows)."""
    _, runner, _ = ModelRunner.load(path)
    seqs = [[*r["prompt_ids"], *r["answer_ids"]] for r in rows]
    ids = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)] = seq
    positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    logits = runner.model().apply({"params": runner.params}, ids, positions, np.ones_like(ids))
    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1))
    return np.array([-sum(logp[i, len(r["prompt_ids"]) - 1 + t, a] for t, a in enumerate(r["answer_ids"]))
                     for i, r in enumerate(rows)])


@pytest.mark.slow
def test_the_kl_to_another_policy_is_the_hand_computed_log_probability_gap(models, data, capsys):
    policy, other, judge = models
    summary, rows = cmp.compare(policy, other, judge, ("pairs:pairs.jsonl",), data, samples=4, max_tokens=6,
                                eval_fraction=0.2, batch_size=8)
    by_hand = hand_nats(other, rows) - hand_nats(policy, rows)
    np.testing.assert_allclose([r["kl_nats"] for r in rows], by_hand, rtol=1e-4, atol=1e-4)
    tokens = sum(len(r["answer_ids"]) for r in rows)
    assert summary["kl_nats_per_answer"] == pytest.approx(by_hand.mean(), rel=1e-4)
    assert summary["kl_nats_per_token"] == pytest.approx(by_hand.sum() / tokens, rel=1e-4)
    assert summary["length_policy"] == tokens / 4 and summary["n"] == 4
    assert summary["kl_nats_per_answer"] > 1.0  # a sharper random model: the gap shows
    wins = [1.0 if r["reward_policy"] > r["reward_baseline"] else 0.5 if r["reward_policy"] == r["reward_baseline"]
            else 0.0 for r in rows]
    assert summary["win_rate"] == pytest.approx(np.mean(wins)) and summary["ties"] == wins.count(0.5)
    lo, hi = summary["win_rate_ci"]
    assert lo <= summary["win_rate"] <= hi
    print(cmp.format_report(summary, as_json=False))
    text = capsys.readouterr().out
    assert "win rate of the policy" in text and "nats per answer" in text and "percentile bootstrap" in text


def test_the_cli_passes_its_flags_and_warns_in_one_line_when_the_kl_is_biased(monkeypatch, data, tmp_path, capsys):
    calls = []

    def fake(*args, **kwargs):
        calls.append((args, kwargs))
        summary = {"n": 2, "win_rate": 0.75, "win_rate_ci": [0.5, 1.0], "ties": 1, "reward_policy": 0.5,
                   "reward_baseline": -0.25, "length_policy": 3.0, "length_baseline": 4.5, "kl_nats_per_answer": 1.5,
                   "kl_nats_per_token": 0.5, "settings": {"policy": "A", "baseline": "B", "judge": "RM",
                   "rewards": "raw", "prompts": ["pairs:x"], "temperature": 0.5, "top_k": 5, "top_p": 1.0,
                   "seed": 3, "max_tokens": 9, "win_rate_ci": cmp.CI_METHOD, "kl_unbiased": False}}
        return summary, [{k: k for k in cmp.OUT_KEYS} | {"answer_ids": [1]}] * 2

    monkeypatch.setattr(cmp, "compare", fake)
    code, out, err = run(capsys, "--policy", "A", "--baseline", "B", "--judge", "RM", "--prompts", "pairs:x, hh:y",
                         "--temperature", "0.5", "--top-k", "5", "--seed", "3", "--max-tokens", "9",
                         "--out", str(tmp_path / "out.jsonl"))
    assert code == 0
    (args, kwargs), = calls
    assert [str(a) for a in args[:3]] == ["A", "B", "RM"] and args[3] == ("pairs:x", "hh:y")
    assert kwargs["sampling"] == Sampling(0.5, 5, 1.0) and kwargs["seed"] == 3 and kwargs["max_tokens"] == 9
    assert kwargs["samples"] == 64 and kwargs["eval_fraction"] == 0.1  # the defaults
    assert err.count("\n") == 1 and "warning: the KL is not an unbiased estimate" in err
    assert "win rate of the policy 75.0% [50.0%, 100.0%]" in out and "(biased: see the warning)" in out
    assert "1.5000 nats per answer" in out and "+0.500" in out and "-0.250" in out
    assert [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()] == \
        [{k: k for k in cmp.OUT_KEYS}] * 2


def one_line_error(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and not out
    assert err.count("\n") == 1 and err.startswith("llm-jax: error: ") and message in err, err


@pytest.mark.parametrize("prompts, flags, message", [
    ("pairs:pairs.jsonl,nope:x.jsonl", (), "--prompts: data.sources entry 'nope:x.jsonl': unknown prompt kind"),
    ("hh:missing*.jsonl", (), "'missing*.jsonl' matches no file"),
    (" , ", (), "give one or more comma-separated prompt sources"),
    ("pairs:pairs.jsonl", ("--eval-fraction", "1"), "--eval-fraction=1.0: must lie strictly between 0 and 1"),
    ("pairs:pairs.jsonl", ("--top-p", "0"), "--top-p=0.0: must be in (0, 1]"),
])
def test_bad_prompts_or_flags_are_one_line_before_any_model_is_read(prompts, flags, message, data, tmp_path, capsys):
    absent = str(tmp_path / "absent")
    one_line_error(capsys, ["--policy", absent, "--baseline", absent, "--judge", absent, "--prompts", prompts,
                            "--data-dir", str(data), *flags], message)


@pytest.mark.parametrize("case, message", [
    ("other tokenizer", "have different tokenizers"),
    ("reward model as policy", "is a reward model (task=reward), not the language model"),
    ("policy as judge", "is a language model (task=pretrain), not the reward model"),
    ("no room", "--max-tokens=40 leaves no room for a prompt in the 32-token context"),
])
def test_bad_models_are_one_line_and_exit_2(case, message, models, data, tmp_path, capsys):
    policy, baseline, judge = models
    flags = FLAGS
    if case == "other tokenizer":
        baseline = shutil.copytree(policy, tmp_path / "other_tokenizer")
        shutil.copy(judge / "tokenizer.model", baseline / "tokenizer.model")
    elif case == "reward model as policy":
        policy = judge
    elif case == "policy as judge":
        judge = policy
    else:
        flags = ("--max-tokens", "40")
    one_line_error(capsys, ["--policy", str(policy), "--baseline", str(baseline), "--judge", str(judge),
                            "--prompts", "pairs:pairs.jsonl", "--data-dir", str(data), *flags], message)
