"""The embedded default: a small Llama trained on this interpreter's standard library source.

No download: the corpus is `sysconfig.get_paths()["stdlib"]` (tests excluded). Sized to finish in a few
minutes on 2 CPU cores with a clearly falling curve.
"""
from llm_jax.config import Config, DataConfig, OptimConfig, TrainConfig, llama


def config() -> Config:
    return Config(
        name="pretrain_tiny",
        model=llama(vocab_size=4096, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384),
        data=DataConfig(sources=("python_stdlib",), seq_len=256, max_bytes=12_000_000,
                        tokenizer_train_bytes=4_000_000),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=30),
        train=TrainConfig(steps=400, batch_size=16, eval_every=100, eval_batches=8, final_eval_batches=40),
    )
