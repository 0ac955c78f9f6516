"""GRPO on Anthropic hh-rlhf prompts (harmless-base): no value model; each prompt's 4 answers are compared with
each other (advantage = (reward - group mean) / group std), scored by the reward model of `rm_hh_rlhf`, with
the KL to the SFT model as a k3 loss term (DeepSeekMath's form). rl.algorithm=rloo gives RLOO.

From the SFT and reward model exports of the documented path (README "RLHF"):
    llm-jax train --config grpo_hh --set checkpoint.init_from=runs/sft-export --set rl.reward_model=runs/rm-export
"""
from llm_jax.config import CheckpointConfig, Config, DataConfig, OptimConfig, RLConfig, TrainConfig


def config() -> Config:
    return Config(
        name="grpo_hh",
        task="rl",
        data=DataConfig(sources=("hh:pref_hh_rlhf/*.jsonl.gz",), seq_len=256, eval_fraction=0.1),
        # 8 prompts × 4 answers per rollout, 2 epochs of 16-answer minibatches: a rollout every 4 steps.
        rl=RLConfig(algorithm="grpo", prompts_per_rollout=8, samples_per_prompt=4, epochs=2, max_answer_tokens=64,
                    kl_coef=0.04, kl_estimator="k3", kl_penalty="loss", eval_prompts=64),
        # At 1e-5 this 3M-parameter policy barely moves (approx KL 1e-4 per token per update, nothing clipped).
        optim=OptimConfig(learning_rate=5e-5, warmup_steps=8, min_lr_ratio=1.0, weight_decay=0.0),
        # 25 rollouts: about 4 minutes on 2 CPU cores.
        train=TrainConfig(steps=100, batch_size=16, eval_every=50, log_every=4),
        checkpoint=CheckpointConfig(every=50),
    )
