"""A tiny reward model for tests and smoke checks; point data.sources at your own pairs and data.tokenizer at a
tokenizer made by llm_jax (or fine-tune an export with checkpoint.init_from)."""
from llm_jax.config import CheckpointConfig, Config, DataConfig, OptimConfig, TrainConfig, llama


def config() -> Config:
    return Config(
        name="rm_tiny",
        task="reward",
        model=llama(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, scan_layers=False),
        data=DataConfig(sources=("pairs:pairs.jsonl",), seq_len=64, eval_fraction=0.2),
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=5, weight_decay=0.0),
        train=TrainConfig(steps=60, batch_size=16, eval_every=30, eval_batches=0, log_every=10),
        checkpoint=CheckpointConfig(every=30),
    )
