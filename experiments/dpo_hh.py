"""DPO on Anthropic hh-rlhf (harmless-base): the policy learns directly from which of two replies people found
less harmful, held near its starting point by the frozen reference (no reward model, no sampling).

Starts from the SFT export of the documented pretrain -> SFT path (README "DPO"), which is also the reference:
    llm-jax train --config dpo_hh --set checkpoint.init_from=runs/sft-export
The held-out 10% of pairs is the reward model's (rm_hh_rlhf: same sources and eval_fraction), so
`llm-jax compare` can judge the policy on prompts neither model trained on.
"""
from llm_jax.config import CheckpointConfig, Config, DataConfig, DPOConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="dpo_hh",
        task="dpo",
        data=DataConfig(sources=("hh:pref_hh_rlhf/*.jsonl.gz",), seq_len=256, eval_fraction=0.1),
        dpo=DPOConfig(beta=0.1),
        # ~1,700 train pairs / 16 = 107 steps: one epoch.
        optim=OptimConfig(learning_rate=1e-4, warmup_steps=10, weight_decay=0.0),
        train=TrainConfig(steps=110, batch_size=16, eval_every=55, eval_batches=0, log_every=5),
        checkpoint=CheckpointConfig(every=55),
    )
