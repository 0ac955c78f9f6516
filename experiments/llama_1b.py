"""A Llama 3.2 1B-shaped model (d 2048, 16 layers, GQA 32/8) at sequence 2048, bf16, for accelerators."""
from llm_jax.config import Config, DataConfig, MeshConfig, OptimConfig, TrainConfig, llama


def config() -> Config:
    return Config(
        name="llama_1b",
        model=llama(vocab_size=32768, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=8192,
                    tie_embeddings=True, rope_theta=500_000.0, compute_dtype="auto", remat="dots_no_batch"),
        mesh=MeshConfig(data=1, fsdp=-1, tensor=1),
        data=DataConfig(sources=("gutenberg:en_gutenberg/books/*.txt.gz",), seq_len=2048, eval_fraction=0.02),
        optim=OptimConfig(learning_rate=3e-4, warmup_steps=1000),
        train=TrainConfig(steps=20_000, batch_size=64, microbatches=4, eval_every=1000, eval_batches=16),
    )
