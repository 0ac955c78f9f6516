"""SFT on Alpaca (English instructions): loss on the answers only.

Fine-tunes an export of a pretrained run: `llm-jax export --run-dir runs/tiny --out runs/tiny-export`, then
`llm-jax train --config sft_alpaca --set checkpoint.init_from=runs/tiny-export`. The model and tokenizer
come from the export.
"""
from llm_jax.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig


def config() -> Config:
    return Config(
        name="sft_alpaca",
        task="sft",
        data=DataConfig(sources=("alpaca:sft_alpaca_en/*.json.gz",), seq_len=256,
                        eval_fraction=0.02),
        # A lower peak than pretraining: the point is to keep what was learnt and add the answering habit.
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=50, weight_decay=0.0),
        train=TrainConfig(steps=1000, batch_size=32, eval_every=200, eval_batches=16),
        checkpoint=CheckpointConfig(every=200),
    )
