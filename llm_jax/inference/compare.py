"""`llm-jax compare`: one policy (A) against a baseline (B), judged by a reward model on held-out prompts.

Prompts: the held-out prompts of the sources (`kind:GLOB`, any kind RL reads: data/chat/prompts.py), in order,
sources in the order given; the first `samples` of them. For preference sources these are the groups that
their training (reward model, DPO, RL) holds out, one prompt per group. `split="train"` takes the training
prompts instead (a pipeline's Comparisons stage makes new preference pairs of them, leaving the held-out
ones for judging); `llm-jax compare` always judges on the held-out split.
Answers: both policies answer every prompt with the same sampling settings and seed (inference/generate.py;
batch k of `batch_size` prompts is sampled with seed + k), the prompt rendered by the chat template
(render_prompt, which ends with the assistant tag) and cut from the left to the model's context
(runner.default_context) less max_tokens; an answer ends at the end of its turn or EOS, as in chat. Lengths
count the generated tokens, the end-of-turn token included.
Judging: the judge scores each prompt's two answers as decoded text exactly as `llm-jax score` scores a pair
(score.Scorer: re-encoded with the judge's tokenizer, one prompt cut for both), normalised by the eval reward
mean and std the judge holds (raw when it holds none). Win rate: per prompt 1 when A's reward is higher, 0.5
for a tie (equal rewards, or identical answers), else 0, averaged; its 95% confidence interval is a percentile
bootstrap over prompts (BOOTSTRAP_RESAMPLES resamples drawn with the fixed seed BOOTSTRAP_SEED).
KL: for each of A's answers y to prompt x, log πA(y|x) - log πB(y|x) summed over y's tokens (its end of turn
included), from one forward pass of each model over prompt + answer (tasks.losses.next_token_nats); averaged
over prompts (nats per answer) and divided by the answer tokens (nats per token). It is an unbiased estimate
of KL(A‖B) over answers only when y is sampled from A itself: temperature 1, no top-k, no top-p (the
defaults); other settings make it a biased figure, and kl_warning says so.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from llm_jax.atomic import write_atomic
from llm_jax.data.batches import answer_rows
from llm_jax.data.chat.dialogue import Message
from llm_jax.data.chat.prompts import split_prompts
from llm_jax.data.chat.template import render_prompt, stop_ids
from llm_jax.errors import ConfigError, DataError
from llm_jax.inference.generate import Generator, Sampling, check_sampling
from llm_jax.inference.runner import ModelRunner, default_context
from llm_jax.inference.score import Scorer, eval_normaliser
from llm_jax.inference.stream import answer_text

BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, LEVEL = 10_000, 0, 0.95
CI_METHOD = f"{LEVEL:.0%} percentile bootstrap over prompts, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}"
OUT_KEYS = ("prompt", "answer_policy", "answer_baseline", "reward_policy", "reward_baseline")


# --- prompts ---------------------------------------------------------------------------------------------

def parse_sources(text: str) -> tuple[str, ...]:
    """The comma-separated `kind:GLOB` sources of --prompts."""
    sources = tuple(s.strip() for s in text.split(",") if s.strip())
    if not sources:
        raise DataError(f"--prompts={text!r}: give one or more comma-separated prompt sources (kind:GLOB)")
    return sources


def held_out_prompts(sources: tuple[str, ...], root: Path, eval_fraction: float, n: int,
                     split: str = "eval") -> list[tuple[Message, ...]]:
    """The first n prompts of the sources' `split` ("eval": the held-out ones; "train"), as RL training splits
    them (prompts.split_prompts)."""
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"--eval-fraction={eval_fraction}: must lie strictly between 0 and 1")
    try:
        prompts = [prompt for _, prompt in split_prompts(sources, Path(root), eval_fraction)[split]]
    except DataError as e:
        raise DataError(f"--prompts: {e}") from None
    if not prompts:
        raise DataError(f"--prompts={','.join(sources)}: no usable prompt in the {split} split")
    return prompts[:n]


def fit_prompt(ids: np.ndarray, context: int, max_tokens: int, model: Path) -> np.ndarray:
    """The prompt's last context - max_tokens ids: room for the answer in the model's context."""
    if max_tokens >= context:
        raise ConfigError(f"--max-tokens={max_tokens} leaves no room for a prompt in the {context}-token context "
                          f"of {model} (its data.seq_len)")
    return ids[-(context - max_tokens):]


def prompt_record(prompt: tuple[Message, ...]):
    """A prompt as `pairs:` and `llm-jax score` read it: a text for one user turn, else a list of messages."""
    if len(prompt) == 1:
        return prompt[0].content
    return [{"role": m.role, "content": m.content} for m in prompt]


# --- answers and their log-probabilities -----------------------------------------------------------------

def answer_all(generator: Generator, tokenizer, prompts: list[np.ndarray], max_tokens: int, seed: int,
               batch_size: int, stops: list[int]) -> list[list[int]]:
    """Each prompt's answer tokens (ending with the end-of-turn token when it stopped); batch k uses seed + k."""
    out = []
    for k, start in enumerate(range(0, len(prompts), batch_size)):
        out += generator.generate([p.tolist() for p in prompts[start:start + batch_size]], max_tokens,
                                  seed=seed + k, stop_ids=stops, pad_id=tokenizer.pad_id)
    return out


def answer_nats(runner: ModelRunner, prompts: list[np.ndarray], answers: list[list[int]], pad_id: int,
                batch_size: int = 16) -> np.ndarray:
    """-log p(answer | prompt) under the runner's model, summed over each answer's tokens: one forward pass over
    prompt + answer per row, through tasks.losses.next_token_nats (so model.logits_chunk applies)."""
    width = max(len(p) + len(a) for p, a in zip(prompts, answers)) - 1  # inputs: all but the last token
    runner.check_length(width, "prompt + answer")
    rows, out = runner.round_rows(batch_size), []
    for start in range(0, len(prompts), rows):
        chunk = answers[start:start + rows]
        batch = answer_rows(prompts[start:start + rows], chunk, width, pad_id, n_rows=rows)
        out.append(np.asarray(runner.summed_nats(runner.params, batch), np.float64)[:len(chunk)])
    return np.concatenate(out)


# --- figures ---------------------------------------------------------------------------------------------

def wins(reward_policy: np.ndarray, reward_baseline: np.ndarray, same: np.ndarray) -> np.ndarray:
    """Per prompt: 1 where the policy's reward is higher, 0.5 for a tie or identical answers, else 0."""
    out = np.where(reward_policy > reward_baseline, 1.0, np.where(reward_policy < reward_baseline, 0.0, 0.5))
    return np.where(same, 0.5, out)


def bootstrap_ci(scores: np.ndarray) -> tuple[float, float]:
    """The LEVEL percentile-bootstrap interval of the mean of per-prompt scores (resampling prompts)."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = scores[rng.integers(0, len(scores), (BOOTSTRAP_RESAMPLES, len(scores)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(lo), float(hi)


def kl_warning(sampling: Sampling) -> str | None:
    """Why the KL is biased under these settings, or None when answers are samples of the policy itself."""
    if sampling == Sampling(temperature=1.0, top_k=0, top_p=1.0):
        return None
    return (f"the KL is not an unbiased estimate of KL(policy||baseline): answers are sampled at temperature="
            f"{sampling.temperature}, top_k={sampling.top_k}, top_p={sampling.top_p}, not from the policy itself "
            "(temperature 1, no top-k/top-p)")


# --- the comparison --------------------------------------------------------------------------------------

def load_policies(policy: Path, baseline: Path, sampling: Sampling, max_tokens: int):
    """((cfg, runner) of the policy, of the baseline), their tokenizer; a ConfigError unless they share the
    tokenizer and the chat template (the KL of one to the other reads the same prompt tokens)."""
    loaded = [ModelRunner.load(Path(path)) for path in (policy, baseline)]
    (cfg, _, tokenizer), (other_cfg, _, other) = loaded
    if tokenizer.sha256 != other.sha256:
        raise ConfigError(f"--policy {policy} and --baseline {baseline} have different tokenizers (sha256 "
                          f"{tokenizer.sha256[:12]} and {other.sha256[:12]}): the KL of one to the other needs one")
    if (cfg.data.chat_template or "llm_jax") != (other_cfg.data.chat_template or "llm_jax"):
        raise ConfigError(f"--policy {policy} and --baseline {baseline} have different chat templates "
                          f"({cfg.data.chat_template!r}, {other_cfg.data.chat_template!r}): the KL needs one")
    for _, runner, _ in loaded:
        check_sampling(sampling, max_tokens, model=runner.cfg)
    return [(cfg, runner) for cfg, runner, _ in loaded], tokenizer


def compare(policy: Path, baseline: Path, judge: Path, sources: tuple[str, ...], root: Path, *, samples: int = 64,
            max_tokens: int = 128, sampling: Sampling = Sampling(), seed: int = 0, eval_fraction: float = 0.1,
            batch_size: int = 16, split: str = "eval") -> tuple[dict, list[dict]]:
    """(summary, one row per prompt) on the prompts of `split` ("eval": held out, or "train"): see the module
    docstring. Rows hold OUT_KEYS and the policy's prompt ids, answer ids and KL (nats)."""
    check_sampling(sampling, max_tokens)  # before anything is read: a bad flag costs nothing
    if samples < 1 or batch_size < 1:
        raise ConfigError(f"--samples={samples} and --batch-size={batch_size} must be at least 1")
    prompts = held_out_prompts(sources, root, eval_fraction, samples, split)
    ((cfg_a, run_a), (cfg_b, run_b)), tokenizer = load_policies(policy, baseline, sampling, max_tokens)
    judge_cfg, judge_runner, judge_tokenizer = ModelRunner.load(Path(judge), head="reward")
    template = cfg_a.data.chat_template
    rendered = [render_prompt(list(p), tokenizer, template) for p in prompts]
    stops = sorted(stop_ids(tokenizer, template))
    ids_a = [fit_prompt(ids, default_context(cfg_a), max_tokens, policy) for ids in rendered]
    ids_b = [fit_prompt(ids, default_context(cfg_b), max_tokens, baseline) for ids in rendered]
    answers_a = answer_all(Generator(run_a, sampling), tokenizer, ids_a, max_tokens, seed, batch_size, stops)
    answers_b = answer_all(Generator(run_b, sampling), tokenizer, ids_b, max_tokens, seed, batch_size, stops)
    kl = (answer_nats(run_b, ids_a, answers_a, tokenizer.pad_id, batch_size)
          - answer_nats(run_a, ids_a, answers_a, tokenizer.pad_id, batch_size))
    texts = [(answer_text(tokenizer, a, stops), answer_text(tokenizer, b, stops))
             for a, b in zip(answers_a, answers_b)]
    judge_scorer = Scorer(judge_runner, judge_cfg.data.seq_len, batch_size, judge_cfg.data.chat_template)
    raw = np.asarray(judge_scorer.answer_rewards([(p, list(pair)) for p, pair in zip(prompts, texts)],
                                                 judge_tokenizer), np.float64)
    normalise, mean, std = eval_normaliser(Path(judge))
    rewards = normalise(raw)
    scores = wins(raw[:, 0], raw[:, 1], np.array([a == b for a, b in texts], bool))
    lengths = np.array([[len(a), len(b)] for a, b in zip(answers_a, answers_b)], np.float64)
    settings = {"policy": str(policy), "baseline": str(baseline), "judge": str(judge), "prompts": list(sources),
                "data_dir": str(root), "split": split, "eval_fraction": eval_fraction, "samples": samples,
                "max_tokens": max_tokens, "temperature": sampling.temperature, "top_k": sampling.top_k,
                "top_p": sampling.top_p, "seed": seed, "batch_size": batch_size, "win_rate_ci": CI_METHOD,
                "rewards": (f"normalised by the judge's eval mean {mean:+.4f} and std {std:.4f}" if mean is not None
                            else "raw: the judge holds no eval reward statistics"),
                "kl_unbiased": kl_warning(sampling) is None}
    summary = {"n": len(prompts), "win_rate": float(scores.mean()), "win_rate_ci": list(bootstrap_ci(scores)),
               "ties": int((scores == 0.5).sum()), "reward_policy": float(rewards[:, 0].mean()),
               "reward_baseline": float(rewards[:, 1].mean()), "length_policy": float(lengths[:, 0].mean()),
               "length_baseline": float(lengths[:, 1].mean()), "kl_nats_per_answer": float(kl.mean()),
               "kl_nats_per_token": float(kl.sum() / lengths[:, 0].sum()), "settings": settings}
    rows = [{"prompt": prompt_record(p), "answer_policy": a, "answer_baseline": b, "reward_policy": float(r[0]),
             "reward_baseline": float(r[1]), "prompt_ids": ids.tolist(), "answer_ids": list(ans), "kl_nats": float(k)}
            for p, (a, b), r, ids, ans, k in zip(prompts, texts, rewards, ids_a, answers_a, kl)]
    return summary, rows


def write_answers(path: Path, rows: list[dict]) -> None:
    """One JSON line of OUT_KEYS per prompt, written atomically."""
    write_atomic(path, "".join(json.dumps({k: row[k] for k in OUT_KEYS}, ensure_ascii=False) + "\n" for row in rows))


def format_report(s: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(s)
    c = s["settings"]
    lo, hi = s["win_rate_ci"]
    return "\n".join([
        f"policy {c['policy']} vs baseline {c['baseline']}, judged by {c['judge']} (rewards {c['rewards']})",
        f"on {s['n']} held-out prompts of {','.join(c['prompts'])}; temperature {c['temperature']}, top-k "
        f"{c['top_k']}, top-p {c['top_p']}, seed {c['seed']}, at most {c['max_tokens']} tokens",
        f"{'':16}{'policy':>10}{'baseline':>10}",
        f"{'mean reward':16}{s['reward_policy']:>+10.3f}{s['reward_baseline']:>+10.3f}",
        f"{'mean length':16}{s['length_policy']:>10.1f}{s['length_baseline']:>10.1f}  tokens",
        f"win rate of the policy {s['win_rate']:.1%} [{lo:.1%}, {hi:.1%}] ({c['win_rate_ci']}), ties {s['ties']}",
        f"KL(policy||baseline) on the policy's answers: {s['kl_nats_per_answer']:.4f} nats per answer, "
        f"{s['kl_nats_per_token']:.4f} per token" + ("" if c["kl_unbiased"] else " (biased: see the warning)")])
