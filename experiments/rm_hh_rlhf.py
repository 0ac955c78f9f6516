"""A pairwise reward model on Anthropic hh-rlhf (harmless-base): which of two replies people found less harmful.

Starts from an export of a pretrained or SFT run, whose model it takes (the trunk is kept, the reward head
starts at zero):
    llm-jax train --config rm_hh_rlhf --set checkpoint.init_from=runs/sft-export
A fixed-seed 10% of the hh-rlhf pairs (split by record, data/chat/preference.py) is held out for eval. To also
train on the qa-feedback comparisons (each of its sources holds out its own 10%, so the hh eval pairs stay
the same):
    --set data.sources=hh:pref_hh_rlhf/*.jsonl.gz,qa_feedback:pref_qa_feedback/*.json.gz
"""
from llm_jax.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="rm_hh_rlhf",
        task="reward",
        data=DataConfig(sources=("hh:pref_hh_rlhf/*.jsonl.gz",), seq_len=256,
                        eval_fraction=0.1),
        # Reward models overfit their comparisons within about an epoch (InstructGPT trains one): ~1,700
        # train pairs / 16 = 107 steps.
        optim=OptimConfig(learning_rate=3e-4, warmup_steps=10, weight_decay=0.0),
        train=TrainConfig(steps=110, batch_size=16, eval_every=25, eval_batches=0, log_every=5),
        checkpoint=CheckpointConfig(every=50),
    )
