"""Rollouts for reinforcement learning (tasks/rl.py): the policy answers prompts on the training mesh, a reward
model scores the answers, and the answers become a RolloutBatch buffer that several epochs of minibatches
train on.

A rollout of P prompts with k answers each (N = P·k rows):
  1. each prompt rendered by the chat template and cut from the left to data.seq_len - rl.max_answer_tokens;
  2. answers sampled by the KV-cache Generator (inference/generate.py) from the current policy params, at
     rl.temperature / top_k / top_p, ending at the end of turn or EOS, at most rl.max_answer_tokens;
  3. scored exactly as `llm-jax score` scores (prompt, answer): the decoded answer re-rendered with the reward
     model's tokenizer, one prompt cut for a prompt's k answers, normalised by its stored eval mean and std;
     an answer cut at the length limit loses rl.missing_eos_penalty;
  4. one teacher-forced pass over prompt + answer rows gives log π and log ref of every sampled token (at the
     sampling temperature) and, for PPO, the value model's estimates; then KL, rewards and advantages
     (advantages.py).
Answers, rewards and advantages are host numpy: the buffer is small and is saved with every checkpoint.
"""
from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from llm_jax.data.batches import RolloutBatch, TokenBatch, answer_rows
from llm_jax.data.chat.template import render_prompt, stop_ids
from llm_jax.inference.generate import Generator, Sampling
from llm_jax.inference.runner import ModelRunner
from llm_jax.inference.stream import answer_text
from llm_jax.model import Transformer
from llm_jax.tasks import advantages as adv
from llm_jax.tasks.losses import policy_logprobs
from llm_jax.train import peft
from llm_jax.train.metrics import param_count


def _cast(params, dtype: str):
    return params if dtype == "float32" else jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)


def _size(name: str, params, note: str) -> str:
    leaves = jax.tree.leaves(params)
    return (f"{name} {param_count(params) / 1e6:.2f}M params, "
            f"{sum(x.size * x.dtype.itemsize for x in leaves) / 2**20:.1f} MiB {leaves[0].dtype} ({note})")


class CountReward:
    """rl.reward_model=count:ID: the number of times token ID occurs in an answer (a planted reward)."""

    def __init__(self, token: int):
        self.token, self.params = token, None

    def __call__(self, prompts, k: int, answers: list[list[int]], texts: list[str]) -> np.ndarray:
        return np.array([a.count(self.token) for a in answers], np.float32)


class ModelReward:
    """A reward model's export or run directory, on the training mesh, scoring as `llm-jax score` does."""

    def __init__(self, path: Path, mesh, dtype: str, batch_size: int):
        from llm_jax import tasks
        from llm_jax.inference.score import Scorer, eval_normaliser  # score.py reads exports, which read tasks
        from llm_jax.train.export import load_for_inference
        cfg, params, self.tokenizer = load_for_inference(path, mesh=mesh)
        runner = ModelRunner(cfg.model, _cast(params, dtype), "reward", tasks.exported_peft(cfg))
        self.params = runner.params
        self.scorer = Scorer(runner, cfg.data.seq_len, batch_size, cfg.data.chat_template)
        self.normalise = eval_normaliser(path)[0]

    def __call__(self, prompts, k: int, answers: list[list[int]], texts: list[str]) -> np.ndarray:
        items = [(prompt, texts[g * k:(g + 1) * k]) for g, prompt in enumerate(prompts)]
        raw = [r for rewards in self.scorer.answer_rewards(items, self.tokenizer) for r in rewards]
        return np.array([self.normalise(r) for r in raw], np.float32)


class RolloutEngine:
    """The models a rollout reads, on the training mesh: the policy's sampler (its params passed at each call),
    the frozen reference, the reward, and one jitted pass for log π, log ref and the values."""

    def __init__(self, cfg, tokenizer, policy_params, value_params=None):
        from llm_jax.train.export import load_frozen_params
        r, self.cfg, self.tokenizer = cfg.rl, cfg, tokenizer
        self.runner = ModelRunner(cfg.model, policy_params, peft=cfg.peft)
        sampling, eval_sampling = (Sampling(t, r.top_k, r.top_p) for t in (r.temperature, r.eval_temperature))
        self.sampler = Generator(self.runner, sampling)
        self.greedy = self.sampler if eval_sampling == sampling else Generator(self.runner, eval_sampling)
        key, path = ("rl.reference", r.reference) if r.reference else ("checkpoint.init_from", cfg.checkpoint.init_from)
        if peft.enabled(cfg) and not r.reference:  # the policy's frozen base, read without its adapters: no copy
            self.reference = peft.frozen_part(policy_params)
        else:
            self.reference = _cast(load_frozen_params(Path(path).expanduser(), cfg, peft.frozen_part(policy_params),
                                                      tokenizer, key, "reference"), r.frozen_dtype)
        kind, _, token = r.reward_model.partition(":")
        self.reward = (CountReward(int(token)) if kind == "count" else
                       ModelReward(Path(r.reward_model).expanduser(), self.runner.mesh, r.frozen_dtype,
                                   cfg.train.batch_size))
        self.stops = sorted(stop_ids(tokenizer, cfg.data.chat_template))
        lm, value = Transformer(cfg.model, peft=cfg.peft), Transformer(cfg.model, "value", peft=cfg.peft)

        def forward(policy, value_params, reference, rows):
            logp_BxT, _ = policy_logprobs(lm, policy, rows, r.temperature)
            ref_logp_BxT, _ = policy_logprobs(lm, reference, rows, r.temperature)
            values_BxT = (jnp.zeros_like(logp_BxT) if value_params is None else
                          value.apply({"params": value_params}, rows.inputs, rows.positions, rows.segment_ids))
            return logp_BxT, ref_logp_BxT, values_BxT
        self._forward = self.runner.jit(forward)
        models = [_size("policy", policy_params, "trained")]
        if value_params is not None:
            models.append(_size("value", value_params, "trained"))
        models.append(_size("reference", self.reference, f"frozen, {path}"))
        if self.reward.params is not None:
            models.append(_size("reward model", self.reward.params, f"frozen, {r.reward_model}"))
        if jax.process_index() == 0:
            tqdm.write("RL models: " + "; ".join(models))  # above the training loop's progress bar

    def prompt_ids(self, prompts) -> list[np.ndarray]:
        """Each prompt rendered by the chat template, cut from the left to leave room for the answer."""
        room = self.cfg.data.seq_len - self.cfg.rl.max_answer_tokens
        return [render_prompt(list(p), self.tokenizer, self.cfg.data.chat_template)[-room:] for p in prompts]

    def answer(self, generator: Generator, policy_params, prompt_ids: list[np.ndarray], seed: int):
        """(answers' tokens, their texts, whether each ended its turn), generated in chunks of a rollout's rows
        (chunk c with seed + c, the last one padded with copies of its last prompt): every call, evaluation's
        too, has one shape of prompts padded to one width, so generation compiles once."""
        r, answers = self.cfg.rl, []
        rows = r.prompts_per_rollout * r.samples_per_prompt
        for c, start in enumerate(range(0, len(prompt_ids), rows)):
            chunk = prompt_ids[start:start + rows]
            chunk += [chunk[-1]] * (rows - len(chunk))
            answers += generator.generate([p.tolist() for p in chunk], r.max_answer_tokens, seed=seed + c,
                                          stop_ids=self.stops, pad_id=self.tokenizer.pad_id, params=policy_params,
                                          prompt_width=self.cfg.data.seq_len - r.max_answer_tokens)
        answers = answers[:len(prompt_ids)]
        ended = np.array([a[-1] in self.stops for a in answers])
        return answers, [answer_text(self.tokenizer, a, self.stops) for a in answers], ended

    def forward(self, policy_params, value_params, rows: TokenBatch) -> tuple[np.ndarray, ...]:
        """(log π, log ref, values) of every target, (N, T) each, in chunks of train.batch_size rows (the last
        one padded: one compilation)."""
        B, N, out = self.cfg.train.batch_size, len(rows.inputs), []
        for start in range(0, N, B):
            chunk = TokenBatch(*(np.concatenate([x[start:start + B], np.zeros_like(x[:max(0, start + B - N)])])
                                 for x in rows))
            out.append(jax.device_get(self._forward(policy_params, value_params, self.reference, chunk)))
        return tuple(np.concatenate(parts)[:N] * rows.weights for parts in zip(*out))

    def rollout(self, policy_params, value_params, prompts, seed: int, kl_coef: float):
        """A RolloutBatch of the k answers to each prompt (numpy, N rows) and the rollout's scalars."""
        r, t0 = self.cfg.rl, time.perf_counter()
        k = r.samples_per_prompt
        prompt_ids = [ids for ids in self.prompt_ids(prompts) for _ in range(k)]
        answers, texts, ended = self.answer(self.sampler, policy_params, prompt_ids, seed)
        scores_N = self.reward(prompts, k, answers, texts)
        rows = answer_rows(prompt_ids, answers, self.cfg.data.seq_len, self.tokenizer.pad_id)
        logp, ref_logp, values = self.forward(policy_params, value_params, rows)
        mask = rows.weights
        kl_NxT = adv.kl_estimate(logp, ref_logp, r.kl_estimator) * mask
        penalised_N = scores_N - r.missing_eos_penalty * (~ended)
        kl_in_reward_NxT = kl_NxT if r.kl_penalty == "reward" else np.zeros_like(kl_NxT)
        rewards_N = penalised_N - kl_coef * kl_in_reward_NxT.sum(1)
        stats = {}
        if value_params is not None:
            advantages, returns = adv.gae(adv.token_rewards(penalised_N, kl_in_reward_NxT, mask, kl_coef), values,
                                          mask, r.gamma, r.lam)
            if r.whiten_advantages:
                advantages = adv.whiten(advantages, mask)
        else:
            per_answer_N, zero_spread_N = adv.group_advantages(rewards_N, k, r.algorithm)
            advantages, returns = per_answer_N[:, None] * mask, np.zeros_like(mask)
            stats["grpo/zero_std_fraction"] = float(zero_spread_N.mean())
        batch = RolloutBatch(*rows[:5], logp, ref_logp, advantages.astype(np.float32), returns.astype(np.float32),
                             values, np.full(len(mask), kl_coef, np.float32))
        seconds = time.perf_counter() - t0
        stats.update({"rl/reward_mean": float(rewards_N.mean()), "rl/reward_std": float(rewards_N.std()),
                      "rl/score_mean": float(scores_N.mean()), "rl/kl": float(kl_NxT.sum(1).mean()),
                      "rl/answer_tokens": float(mask.sum(1).mean()), "rl/eos_fraction": float(ended.mean()),
                      "rl/kl_coef": kl_coef, "perf/rollout_s": seconds,
                      "perf/rollout_tokens_per_sec": float(mask.sum()) / seconds})
        return batch, stats

    def evaluate(self, policy_params, value_params, prompts) -> dict[str, float]:
        """Sums over one answer to each held-out prompt (rl.eval_temperature; greedy by default): the
        score alone, the reward (less the missing-end penalty), KL (k1, nats per answer), tokens, ended turns."""
        r = self.cfg.rl
        prompt_ids = self.prompt_ids(prompts)
        answers, texts, ended = self.answer(self.greedy, policy_params, prompt_ids, seed=0)
        scores_N = self.reward(prompts, 1, answers, texts)
        rows = answer_rows(prompt_ids, answers, self.cfg.data.seq_len, self.tokenizer.pad_id)
        logp, ref_logp, _ = self.forward(policy_params, value_params, rows)  # the values: one compilation
        return {"answers": float(len(answers)), "score": float(scores_N.sum()),
                "reward": float((scores_N - r.missing_eos_penalty * (~ended)).sum()),
                "kl": float((logp - ref_logp).sum()), "tokens": float(rows.weights.sum()), "ended": float(ended.sum())}
