"""The config sections of the post-training tasks (reward model, DPO, RL), of parameter-efficient fine-tuning
and of in-context evaluation (any task), their choices and their checks; config.py holds them in Config and
re-exports them."""
from __future__ import annotations

import re
from dataclasses import dataclass

from llm_jax.errors import ConfigError


@dataclass(frozen=True)
class RewardConfig:
    """The pairwise (Bradley-Terry) loss of a reward model: -log sigmoid(r_chosen - r_rejected - margin)."""
    use_margins: bool = True  # subtract each pair's `margin` from the data (pairs without one have 0)
    center_coef: float = 0.0  # adds center_coef * mean((r_chosen + r_rejected)^2), keeping rewards near 0


@dataclass(frozen=True)
class DPOConfig:
    """Preference optimisation without a reward model (tasks/dpo.py). With h = (log π(chosen) - log ref(chosen))
    - (log π(rejected) - log ref(rejected)), log-probabilities summed over each answer's tokens:
    sigmoid (DPO) -(1-ε) log σ(βh) - ε log σ(-βh), ε = label_smoothing; ipo (h - 1/(2β))²."""
    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid | ipo
    label_smoothing: float = 0.0  # sigmoid only: the assumed probability that a pair's label is flipped
    reference: str = ""  # an export whose params are the frozen reference; empty: checkpoint.init_from's


@dataclass(frozen=True)
class RLConfig:
    """Reinforcement learning from a reward model (tasks/rl.py): rollouts of the policy on prompts, scored,
    then several epochs of clipped policy-gradient minibatches on them. KL is in nats (per token, summed over
    an answer where an answer's KL is meant)."""
    algorithm: str = "ppo"  # ppo (value model, GAE) | grpo (group mean/std) | rloo (leave-one-out baseline)
    # An export (or run directory) of a reward model, or "count:ID": the number of times token ID occurs in the
    # answer (a planted reward that tests and checks a setup with no reward model)
    reward_model: str = ""
    reference: str = ""  # the frozen reference's export; empty: checkpoint.init_from's (the initial policy)
    value_init: str = "reward_model"  # ppo: the value model's trunk from the reward model | policy
    prompts_per_rollout: int = 16
    samples_per_prompt: int = 4  # k answers to each prompt (grpo and rloo compare them: k >= 2)
    epochs: int = 2  # optimisation passes over each rollout, in minibatches of train.batch_size answers
    max_answer_tokens: int = 64
    temperature: float = 1.0  # rollouts' sampling; log-probabilities are of the policy at this temperature
    top_k: int = 0
    top_p: float = 1.0
    missing_eos_penalty: float = 1.0  # subtracted from the score of an answer cut at max_answer_tokens
    kl_coef: float = 0.05  # β: the initial one when kl_target is set
    kl_estimator: str = "k1"  # per token, with r = log ref - log π: k1 -r, k2 r²/2, k3 e^r - 1 - r
    kl_penalty: str = "reward"  # reward: -β·KL per token in the reward (InstructGPT) | loss: β·KL in the loss
    kl_target: float = 0.0  # > 0: adapt β toward this KL per answer (Ziegler et al. 2019); 0: β fixed
    kl_horizon: int = 10_000  # answers over which the controller moves β by at most 20%
    gamma: float = 1.0
    lam: float = 0.95  # GAE's λ
    clip_ratio: float = 0.2
    clip_value: float = 0.2  # ppo: how far a value may move from its rollout value before its loss is clipped
    value_coef: float = 0.5
    entropy_coef: float = 0.0
    whiten_advantages: bool = True  # ppo: advantages to mean 0, std 1 over a rollout's answer tokens
    frozen_dtype: str = "float32"  # float32 | bfloat16: how the reference and the reward model are held
    eval_prompts: int = 32  # held-out prompts answered at each evaluation
    eval_temperature: float = 0.0  # 0: greedy answers at evaluation


@dataclass(frozen=True)
class PeftConfig:
    """Parameter-efficient fine-tuning of the checkpoint.init_from export (model/adapters.py): only the adapters
    (and a task's new head) train; the base weights stay frozen, outside the train state and its checkpoints.
    lora: each kernel whose path matches `targets` gains x·A·B·alpha/rank (Hu et al. 2021), B zero at first.
    prompt: `virtual_tokens` learned input embeddings run through the frozen blocks (Lester et al. 2021);
    prefix: `virtual_tokens` learned keys and values per layer (Li & Liang 2021). Real tokens attend to the
    virtual ones through a per-head gate that starts at zero (LLaMA-Adapter, Zhang et al. 2023), so step 0 is the
    base model exactly, as it is for LoRA."""
    method: str = "none"  # none | lora | prompt | prefix
    rank: int = 8
    alpha: float = 16.0
    # A regex searched in each kernel's path ("layers/attn/q/kernel"); default: attention and MLP kernels
    targets: str = r"(^|/)(q|k|v|o|gate|up|down)/kernel$"
    dropout: float = 0.0  # lora: dropout on the adapters' input in training steps (not in evaluation or decoding)
    virtual_tokens: int = 16  # prompt and prefix
    base_dtype: str = "float32"  # float32 | bfloat16: how the frozen base weights are held


@dataclass(frozen=True)
class EvalConfig:
    """In-context benchmarks (evaluation/benchmarks.py, scored by evaluation/icl.py) run at every
    train.eval_every and at the end of a language model's training, logged as tasks/<name>/<k>shot/acc."""
    tasks: tuple[str, ...] = ()  # benchmark names: blimp, sling, truthfulqa_mc, gsm8k, cmmlu, piqa
    shots: tuple[int, ...] = (0,)
    limit: int = 200  # scored items per benchmark and shot count (0: all): an evaluation, not a training cost
    seed: int = 1234  # which exemplars are drawn: the same for every model
    max_gen_tokens: int = 128  # generation benchmarks (gsm8k): the answer's token budget


CHOICES = {
    "peft.method": ("none", "lora", "prompt", "prefix"),
    "peft.base_dtype": ("float32", "bfloat16"),
    "dpo.loss": ("sigmoid", "ipo"),
    "rl.algorithm": ("ppo", "grpo", "rloo"),
    "rl.value_init": ("reward_model", "policy"),
    "rl.kl_estimator": ("k1", "k2", "k3"),
    "rl.kl_penalty": ("reward", "loss"),
    "rl.frozen_dtype": ("float32", "bfloat16"),
}


def validate(cfg) -> None:
    """The numeric checks of the task sections (the choices are checked with config.CHOICES)."""
    if cfg.reward.center_coef < 0 or cfg.model.reward_init_std < 0:
        raise ConfigError(f"reward.center_coef={cfg.reward.center_coef} and model.reward_init_std="
                          f"{cfg.model.reward_init_std} must not be negative")
    if cfg.dpo.beta <= 0 or not 0.0 <= cfg.dpo.label_smoothing < 0.5:
        raise ConfigError(f"dpo.beta={cfg.dpo.beta} must be positive and dpo.label_smoothing="
                          f"{cfg.dpo.label_smoothing} in [0, 0.5)")
    r = cfg.rl
    positive = {"rl.prompts_per_rollout": r.prompts_per_rollout, "rl.samples_per_prompt": r.samples_per_prompt,
                "rl.epochs": r.epochs, "rl.max_answer_tokens": r.max_answer_tokens, "rl.kl_horizon": r.kl_horizon,
                "rl.eval_prompts": r.eval_prompts}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    non_negative = {"rl.kl_coef": r.kl_coef, "rl.kl_target": r.kl_target, "rl.missing_eos_penalty":
                    r.missing_eos_penalty, "rl.clip_value": r.clip_value, "rl.value_coef": r.value_coef,
                    "rl.entropy_coef": r.entropy_coef, "rl.eval_temperature": r.eval_temperature}
    for key, value in non_negative.items():
        if not value >= 0:
            raise ConfigError(f"{key}={value} must not be negative")
    _check_peft(cfg)
    _check_eval(cfg)
    if not (0 < r.clip_ratio < 1 and 0 <= r.gamma <= 1 and 0 <= r.lam <= 1):
        raise ConfigError(f"rl.clip_ratio={r.clip_ratio} must lie in (0, 1), rl.gamma={r.gamma} and "
                          f"rl.lam={r.lam} in [0, 1]")


def _check_eval(cfg) -> None:
    e = cfg.eval
    if not e.tasks:
        return
    from llm_jax import tasks  # late: the tasks import the config
    from llm_jax.evaluation.benchmarks import TASKS
    unknown = [name for name in e.tasks if name not in TASKS]
    if unknown:
        raise ConfigError(f"eval.tasks: {', '.join(unknown)} unknown (known: {', '.join(TASKS)})")
    head = getattr(tasks.TASKS.get(cfg.task), "head", "lm")  # an unknown task is tasks.make's to report
    if head != "lm":
        raise ConfigError(f"eval.tasks needs a language model; task={cfg.task} trains a {head} head")
    if not e.shots or min(e.shots) < 0 or e.limit < 0 or e.max_gen_tokens <= 0:
        raise ConfigError(f"eval.shots={e.shots} must be counts >= 0, eval.limit={e.limit} >= 0 and "
                          f"eval.max_gen_tokens={e.max_gen_tokens} > 0")


def _check_peft(cfg) -> None:
    p = cfg.peft
    if p.method == "none":
        return
    if p.rank <= 0 or p.alpha <= 0 or p.virtual_tokens <= 0:
        raise ConfigError(f"peft.rank={p.rank}, peft.alpha={p.alpha} and peft.virtual_tokens={p.virtual_tokens} "
                          "must be positive")
    if not 0.0 <= p.dropout < 1.0:
        raise ConfigError(f"peft.dropout={p.dropout} must lie in [0, 1)")
    try:
        re.compile(p.targets)
    except re.error as e:
        raise ConfigError(f"peft.targets={p.targets!r} is not a regular expression: {e}") from None
