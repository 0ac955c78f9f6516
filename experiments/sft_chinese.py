"""Chinese SFT: hikariming's Chinese Q&A (Alpaca schema) and the MOSS conversations that open in Chinese.

Start from a Chinese pretrained model: `--set checkpoint.init_from=EXPORT` of a pretrain_chinese run.
"""
from llm_jax.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="sft_chinese",
        task="sft",
        data=DataConfig(sources=("alpaca:sft_zh_qa_hikariming/*.json",
                                                     "moss_zh:sft_moss003_zh_en/**/*.json"),
                        seq_len=512, eval_fraction=0.03),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=50, weight_decay=0.0),
        train=TrainConfig(steps=1000, batch_size=16, eval_every=200, eval_batches=8),
        checkpoint=CheckpointConfig(every=200),
    )
