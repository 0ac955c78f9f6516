"""A tiny DPO run for tests and smoke checks, on any export and pairs file:
    llm-jax train --config dpo_tiny --set checkpoint.init_from=EXPORT --set data.sources=pairs:FILE.jsonl
The model and tokenizer come from the export, which is also the frozen reference."""
from llm_jax.config import CheckpointConfig, Config, DataConfig, DPOConfig, OptimConfig, TrainConfig, llama


def config() -> Config:
    return Config(
        name="dpo_tiny",
        task="dpo",
        model=llama(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, scan_layers=False),
        data=DataConfig(sources=("pairs:pairs.jsonl",), seq_len=64, eval_fraction=0.2),
        dpo=DPOConfig(beta=0.1),
        # DPO moves a model fast: at 3e-3 this model's answers turn to noise within 40 steps.
        optim=OptimConfig(learning_rate=3e-4, warmup_steps=5, weight_decay=0.0),
        train=TrainConfig(steps=60, batch_size=16, eval_every=30, eval_batches=0, log_every=10),
        checkpoint=CheckpointConfig(every=30),
    )
