"""GPT-2 small (124M at GPT-2's vocabulary; ours is a 32k sentencepiece) for one accelerator or more."""
from llm_jax.config import Config, DataConfig, OptimConfig, TrainConfig, gpt2


def config() -> Config:
    return Config(
        name="gpt2_124m",
        model=gpt2(vocab_size=32768, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=1024,
                   compute_dtype="auto", remat="none"),
        data=DataConfig(sources=("gutenberg:en_gutenberg/books/*.txt.gz",), seq_len=1024, eval_fraction=0.02),
        optim=OptimConfig(learning_rate=6e-4, warmup_steps=700, weight_decay=0.1),
        train=TrainConfig(steps=20_000, batch_size=256, microbatches=4, eval_every=1000, eval_batches=32),
    )
