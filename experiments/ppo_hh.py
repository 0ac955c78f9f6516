"""PPO on Anthropic hh-rlhf prompts (harmless-base), InstructGPT's recipe: the SFT policy answers, the reward
model of `rm_hh_rlhf` scores, a value model started from that reward model's trunk estimates returns, and a
per-token KL penalty (k1 in the reward) holds the policy near the SFT model.

From the SFT and reward model exports of the documented pretrain -> SFT -> reward model path (README "RLHF"):
    llm-jax train --config ppo_hh --set checkpoint.init_from=runs/sft-export --set rl.reward_model=runs/rm-export
The held-out 10% of prompts are the reward model's held-out groups (same sources and eval_fraction), so
`llm-jax compare` can judge the policy on prompts neither model trained on.
"""
from llm_jax.config import CheckpointConfig, Config, DataConfig, OptimConfig, RLConfig, TrainConfig


def config() -> Config:
    return Config(
        name="ppo_hh",
        task="rl",
        data=DataConfig(sources=("hh:pref_hh_rlhf/*.jsonl.gz",), seq_len=256, eval_fraction=0.1),
        # 16 prompts × 2 answers per rollout, 2 epochs of 16-answer minibatches: a rollout every 4 steps.
        rl=RLConfig(algorithm="ppo", value_init="reward_model", prompts_per_rollout=16, samples_per_prompt=2,
                    epochs=2, max_answer_tokens=64, kl_coef=0.05, kl_estimator="k1", kl_penalty="reward",
                    eval_prompts=64),
        # At 1e-5 this 3M-parameter policy barely moves (approx KL 1e-4 per token per update, nothing clipped).
        optim=OptimConfig(learning_rate=5e-5, warmup_steps=8, min_lr_ratio=1.0, weight_decay=0.0),
        # 25 rollouts: about 4 minutes on 2 CPU cores.
        train=TrainConfig(steps=100, batch_size=16, eval_every=50, log_every=4),
        checkpoint=CheckpointConfig(every=50),
    )
