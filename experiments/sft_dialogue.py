"""Multi-turn SFT: MOSS-003 conversations (Chinese and English) and the best-ranked oasst1 paths.

Needs `--set checkpoint.init_from=EXPORT` (see sft_alpaca.py); the model and tokenizer come from it.
"""
from llm_jax.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="sft_dialogue",
        task="sft",
        data=DataConfig(sources=("moss:sft_moss003_zh_en/**/*.json", "oasst:sft_oasst1_en/*.jsonl.gz"),
                        seq_len=512, eval_fraction=0.05),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=30, weight_decay=0.0),
        train=TrainConfig(steps=500, batch_size=16, eval_every=100, eval_batches=8),
        checkpoint=CheckpointConfig(every=100),
    )
