"""90 Project Gutenberg books (67 MB of English), header and license footer stripped."""
from llm_jax.config import Config, DataConfig, OptimConfig, TrainConfig, llama


def config() -> Config:
    return Config(
        name="pretrain_gutenberg",
        model=llama(vocab_size=16384, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=1536),
        data=DataConfig(sources=("gutenberg:en_gutenberg/books/*.txt.gz",), seq_len=512, eval_fraction=0.02),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=500),
        train=TrainConfig(steps=20_000, batch_size=64, eval_every=1000, eval_batches=64),
    )
