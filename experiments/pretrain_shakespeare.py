"""Tiny Shakespeare (1 MB), the last 10% of the text held out for evaluation."""
from llm_jax.config import Config, DataConfig, OptimConfig, TrainConfig, llama


def config() -> Config:
    return Config(
        name="pretrain_shakespeare",
        model=llama(vocab_size=2048, d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, d_ff=768),
        data=DataConfig(sources=("text:en_tinyshakespeare/input.txt",), seq_len=256, eval_fraction=0.1),
        optim=OptimConfig(learning_rate=2e-3, warmup_steps=100),
        train=TrainConfig(steps=2000, batch_size=32, eval_every=250, eval_batches=16),
    )
