"""Tiny Shakespeare (1 MB), the last 10% of the text held out: the best model in two minutes of training.

The embedded default's shape, sized by wall-clock (train.time_budget_s=110), not by steps: the step count is
planned from the measured step rate, so the run takes the same training time on any machine. The recipe is
what the ablations measured best here (docs/recipe.md): Muon, a ReLU² MLP, a 4096-piece vocabulary and
batches of 16 (more, smaller steps). Compare nanoGPT's character-level GPU recipe, about 2.12 bits/byte
after 5,000 A100 steps.
"""
from llm_jax.config import Config, DataConfig, OptimConfig, TrainConfig, llama


def config() -> Config:
    return Config(
        name="pretrain_shakespeare",
        model=llama(vocab_size=4096, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=576, mlp="relu2",
                    scan_layers=False),
        data=DataConfig(sources=("text:en_tinyshakespeare/input.txt",), seq_len=128, eval_fraction=0.1,
                        tokenizer_train_bytes=4_000_000),
        optim=OptimConfig(optimizer="muon", learning_rate=5e-3, warmup_steps=30),
        train=TrainConfig(time_budget_s=110, batch_size=16, eval_every=200, eval_batches=0),
    )
