"""Tiny Shakespeare (1 MB), the last 10% of the text held out: the best model in two minutes of training.

The embedded default's shape, sized by wall-clock (train.time_budget_s=110), not by steps: the step count is
planned from the measured step rate, so the run takes the same training time on any machine. The recipe is
what the ablations measured best here (docs/recipe.md): Muon, a ReLU² MLP, a 4096-piece vocabulary and
batches of 16 (more, smaller steps). Compare nanoGPT's character-level GPU recipe, about 2.12 bits/byte
after 5,000 A100 steps.
"""
import dataclasses

from llm_jax.config import Config, DataConfig
from llm_jax.experiment import load_experiment


def config() -> Config:
    tiny = load_experiment("pretrain_tiny")  # its model and optimizer; the data, budget and batch of its own
    return dataclasses.replace(
        tiny, name="pretrain_shakespeare",
        data=DataConfig(sources=("text:en_tinyshakespeare/input.txt",), seq_len=128, eval_fraction=0.1,
                        tokenizer_train_bytes=4_000_000),
        train=dataclasses.replace(tiny.train, time_budget_s=110, batch_size=16))
