"""Reinforcement learning from a reward model: PPO (InstructGPT's recipe), GRPO and RLOO (rl.algorithm).

Batches come from the model itself (rollout_buffer.RolloutSource, rollout.RolloutEngine): the policy answers
train prompts, a reward model scores them, and the rollout is trained on for rl.epochs epochs of minibatches.
Every quantity is per next-token target and counts only on answer tokens (RolloutBatch.weights); the loss is
their mean over a minibatch's answer tokens:
    policy   -min(ρ·A, clip(ρ, 1 ± rl.clip_ratio)·A),  ρ = π(a)/π_old(a), π_old the rollout's policy
    KL       + β·k(π, ref) per token, when rl.kl_penalty=loss (GRPO's way); with kl_penalty=reward (PPO's,
             InstructGPT's) the rollout puts -β·k on every answer token's reward instead
    value    + rl.value_coef·½·max((V - R)², (V_clip - R)²), V_clip = V_old + clip(V - V_old, ±rl.clip_value)
    entropy  - rl.entropy_coef·H(π)
Advantages A (advantages.py): PPO, GAE(γ, λ) over the answer's per-token rewards with the value model's
estimates, whitened over a rollout; GRPO, (R - group mean)/group std over the k answers to a prompt; RLOO,
R minus the mean of the other k-1. PPO trains the policy and the value model as one params tree
(model/transformer.PolicyAndValue); its exports hold the policy alone, a language model like any other.
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from llm_jax.data.batches import RolloutBatch
from llm_jax.data.chat import prompts
from llm_jax.errors import ConfigError
from llm_jax.inference.generate import Sampling, check_sampling
from llm_jax.model import Transformer
from llm_jax.model.transformer import PolicyAndValue
from llm_jax.tasks import advantages as adv
from llm_jax.tasks.base import Evaluation, Summary, Task
from llm_jax.tasks.losses import policy_logprobs
from llm_jax.tasks.rollout import RolloutEngine
from llm_jax.tasks.rollout_buffer import RolloutSource


def clipped_sums(logp_BxT, entropy_BxT, values_BxT, batch: RolloutBatch, r) -> dict:
    """Sums of the objective and of what the scalars report over the answer tokens of a minibatch; r: RLConfig.
    values_BxT is None without a value model."""
    w = batch.weights
    total = lambda x: jnp.sum(x * w)  # noqa: E731
    log_ratio = logp_BxT - batch.old_logprobs
    ratio = jnp.exp(log_ratio)
    A = batch.advantages
    policy = -jnp.minimum(ratio * A, jnp.clip(ratio, 1 - r.clip_ratio, 1 + r.clip_ratio) * A)
    kl = adv.kl_estimate(logp_BxT, batch.ref_logprobs, r.kl_estimator)
    loss = policy - r.entropy_coef * entropy_BxT
    if r.kl_penalty == "loss":
        loss = loss + batch.kl_coef[:, None] * kl
    sums = {"tokens": jnp.sum(w), "answers": jnp.sum(jnp.max(w, axis=-1)), "policy_loss": total(policy),
            "ratio": total(ratio), "clipped": total((jnp.abs(ratio - 1) > r.clip_ratio).astype(jnp.float32)),
            "approx_kl": total(ratio - 1 - log_ratio), "entropy": total(entropy_BxT), "kl": total(kl)}
    if values_BxT is not None:
        clipped_v = batch.old_values + jnp.clip(values_BxT - batch.old_values, -r.clip_value, r.clip_value)
        plain_sq, clipped_sq = (values_BxT - batch.returns) ** 2, (clipped_v - batch.returns) ** 2
        value = 0.5 * jnp.maximum(plain_sq, clipped_sq)
        loss = loss + r.value_coef * value
        sums.update(value_loss=total(value), value_clipped=total((clipped_sq > plain_sq).astype(jnp.float32)))
    return {"loss": total(loss), **sums}


def train_scalars(sums: dict) -> dict:
    """Means over answer tokens; ppo/approx_kl is k3 of the policy against the rollout's (how far an update
    moved), rl/kl_to_reference the rl.kl_estimator of the policy against the reference (nats per token)."""
    tokens = jnp.maximum(sums["tokens"], 1.0)
    out = {"train/loss": sums["loss"] / tokens, "ppo/policy_loss": sums["policy_loss"] / tokens,
           "ppo/ratio_mean": sums["ratio"] / tokens, "ppo/clip_fraction": sums["clipped"] / tokens,
           "ppo/approx_kl": sums["approx_kl"] / tokens, "rl/entropy": sums["entropy"] / tokens,
           "rl/kl_to_reference": sums["kl"] / tokens}
    if "value_loss" in sums:
        out.update({"ppo/value_loss": sums["value_loss"] / tokens,
                    "ppo/value_clip_fraction": sums["value_clipped"] / tokens})
    return out


def eval_scalars(sums: dict) -> dict:
    answers = max(sums["answers"], 1.0)
    return {"eval/score_mean": sums["score"] / answers, "eval/reward_mean": sums["reward"] / answers,
            "eval/kl": sums["kl"] / answers, "eval/answer_tokens": sums["tokens"] / answers,
            "eval/eos_fraction": sums["ended"] / answers}


class RL(Task):
    name = "rl"
    batch_type = RolloutBatch
    loss, count = "loss", "tokens"
    counts = ("answers",)
    progress = ("kl", "rl/kl_to_reference")
    summary_scalars = (("ppo/approx_kl", "train approx KL"), ("eval/kl", "eval KL nats/answer"),
                       ("eval/answer_tokens", "eval answer tokens"), ("eval/score_mean", "eval score"))
    source_kinds = prompts.KINDS
    prepared_type = prompts.PreparedPrompts
    needs_tokenizer = True
    throughput = "perf/update_tokens_per_sec"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._engine = None

    @property
    def ppo(self) -> bool:
        return self.cfg.rl.algorithm == "ppo"

    @classmethod
    def trained_model(cls, cfg):
        return PolicyAndValue(cfg.model, cfg.peft) if cfg.rl.algorithm == "ppo" else Transformer(cfg.model, peft=cfg.peft)

    @staticmethod
    def exported_params(params):
        return params["policy"] if set(params) == {"policy", "value"} else params

    def policy_and_value(self, params):
        return (params["policy"], params["value"]) if self.ppo else (params, None)

    def check(self) -> None:
        super().check()
        c, r = self.cfg, self.cfg.rl
        if not c.checkpoint.init_from:
            raise ConfigError("task=rl trains a policy from an export: set checkpoint.init_from=EXPORT (an SFT or "
                              "imported model; also the reference unless rl.reference is set)")
        kind, _, token = r.reward_model.partition(":")
        if kind == "count":
            if not token.isdigit() or int(token) >= c.model.vocab_size:
                raise ConfigError(f"rl.reward_model={r.reward_model}: count:ID needs a token id below "
                                  f"{c.model.vocab_size}")
            if self.ppo and r.value_init == "reward_model":
                raise ConfigError(f"rl.reward_model={r.reward_model} has no trunk for the value model: set "
                                  "rl.value_init=policy")
        else:
            self._check_reward_model(Path(r.reward_model).expanduser())
        if not self.ppo and r.samples_per_prompt < 2:
            raise ConfigError(f"rl.algorithm={r.algorithm} compares the answers to a prompt: rl.samples_per_prompt="
                              f"{r.samples_per_prompt} must be at least 2")
        rows = r.prompts_per_rollout * r.samples_per_prompt
        if rows % c.train.batch_size:
            raise ConfigError(f"rl.prompts_per_rollout × rl.samples_per_prompt = {rows} answers per rollout must "
                              f"be a multiple of train.batch_size={c.train.batch_size}")
        if r.max_answer_tokens >= c.data.seq_len:
            raise ConfigError(f"rl.max_answer_tokens={r.max_answer_tokens} leaves no room for a prompt in "
                              f"data.seq_len={c.data.seq_len}")
        if not r.temperature > 0:
            raise ConfigError(f"rl.temperature={r.temperature}: rollouts sample, so it must be positive")
        check_sampling(Sampling(r.temperature, r.top_k, r.top_p), r.max_answer_tokens, model=c.model,
                       name=lambda field: f"rl.{'max_answer_tokens' if field == 'max_tokens' else field}")
        if c.model.logits_chunk:
            raise ConfigError(f"model.logits_chunk={c.model.logits_chunk}: task=rl computes entropies from whole "
                              "logits; set model.logits_chunk=0")
        if jax.process_count() > 1:
            raise ConfigError(f"task=rl generates on one process; this run has {jax.process_count()}")
        for key, rate in (("peft.dropout", c.peft.dropout), ("model.dropout", c.model.dropout)):
            if rate:  # the clipped ratio compares the update's log-probabilities with the rollout's
                raise ConfigError(f"{key}={rate}: task=rl's ratio against the rollout (which samples without "
                                  f"dropout) would not start at 1; set {key}=0")

    def _check_reward_model(self, path: Path) -> None:
        from llm_jax import tasks
        from llm_jax.train.export import saved_config
        if not self.cfg.rl.reward_model:
            raise ConfigError("task=rl needs rl.reward_model: a reward model's export or run directory, or "
                              "count:ID (a planted reward)")
        if not path.exists():
            raise ConfigError(f"rl.reward_model={path}: no such directory")
        saved = saved_config(path, key="rl.reward_model")
        if tasks.TASKS[saved.task].head != "reward":
            raise ConfigError(f"rl.reward_model={path} is a task={saved.task} model, not a reward model")

    # --- data -----------------------------------------------------------------------------------------------
    def prepare(self, out_dir: Path) -> None:
        prompts.prepare_prompts(self.cfg, out_dir, self.cfg.data.tokenizer)

    def train_source(self, data, process_index: int, process_count: int) -> RolloutSource:
        self.tokenizer = data.tokenizer
        return RolloutSource(self, data.prompts("train"))

    def engine(self, params) -> RolloutEngine:
        """The rollout engine, made on first use from the trained params (their mesh and layout)."""
        if self._engine is None:
            self._engine = RolloutEngine(self.cfg, self.tokenizer, *self.policy_and_value(params))
        return self._engine

    def evaluate(self, data, params, eval_step, max_batches: int) -> tuple[dict, int]:
        self.tokenizer = data.tokenizer
        held_out = data.prompts("eval")[:self.cfg.rl.eval_prompts]
        return self.engine(params).evaluate(*self.policy_and_value(params), held_out), 1

    def initial_params(self, target_params) -> tuple[dict, list[str]]:
        if not self.ppo:
            return super().initial_params(target_params)
        from llm_jax.train.export import load_params
        r = self.cfg.rl
        policy, fresh = load_params(Path(self.cfg.checkpoint.init_from), self.cfg, target_params["policy"])
        key, path = (("rl.reward_model", r.reward_model) if r.value_init == "reward_model" else
                     ("checkpoint.init_from", self.cfg.checkpoint.init_from))
        value, fresh_value = load_params(Path(path).expanduser(), self.cfg, target_params["value"], key)
        return {"policy": policy, "value": value}, fresh + [f"value/{name}" for name in fresh_value]

    # --- objective ------------------------------------------------------------------------------------------
    def sums(self, model, params, batch: RolloutBatch, frozen: dict) -> dict:
        policy_params, value_params = self.policy_and_value(params)
        c = self.cfg
        logp, entropy = policy_logprobs(Transformer(c.model, peft=c.peft), policy_params, batch, c.rl.temperature)
        values = None
        if value_params is not None:
            values = Transformer(c.model, "value", peft=c.peft).apply(
                {"params": value_params}, batch.inputs, batch.positions, batch.segment_ids)
        return clipped_sums(logp, entropy, values, batch, self.cfg.rl)

    def scalars(self, sums: dict, prefix: str) -> dict:
        return eval_scalars(sums) if prefix == "eval" else train_scalars(sums)

    # --- reporting ------------------------------------------------------------------------------------------
    @property
    def flops_per_token(self) -> float:
        return super().flops_per_token * (2 if self.ppo else 1)  # PPO's value model: a second forward+backward

    def step_shape(self) -> str:
        return f"{self.cfg.train.batch_size} answers × {self.cfg.data.seq_len} tokens/step"

    def describe(self, data) -> str:
        r, splits = self.cfg.rl, data.meta["splits"]
        steps = r.epochs * r.prompts_per_rollout * r.samples_per_prompt // self.cfg.train.batch_size
        return (f"{splits['train']['prompts']:,} train / {splits['eval']['prompts']:,} eval prompts, {r.algorithm}: "
                f"{r.prompts_per_rollout} prompts × {r.samples_per_prompt} answers per rollout, {steps} steps each, "
                f"reward {r.reward_model}, β={r.kl_coef}{' (adaptive)' if r.kl_target else ''}")

    def finish(self, data, evaluation: Evaluation) -> Summary:
        s = evaluation.scores
        return Summary({}, {}, f"\nheld-out prompts: {int(evaluation.sums['answers'])}, score "
                               f"{s['eval/score_mean']:+.3f} (reward {s['eval/reward_mean']:+.3f}), KL to the "
                               f"reference {s['eval/kl']:.3f} nats/answer, {s['eval/answer_tokens']:.1f} "
                               f"tokens/answer, {s['eval/eos_fraction']:.0%} ended their turn")
