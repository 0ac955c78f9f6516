"""The embedded default: a small Llama trained on this interpreter's standard library source.

No download: the corpus is `sysconfig.get_paths()["stdlib"]` (tests excluded). Shaped for a budget of
about four minutes on 2 CPU cores (~1e13 FLOPs): at that budget a small model that sees more tokens
compresses better than a wide one, and a 2k vocabulary keeps the output layer from dominating the step.
"""
from llm_jax.config import Config, DataConfig, OptimConfig, TrainConfig, llama


def config() -> Config:
    return Config(
        name="pretrain_tiny",
        # Unrolled layers: on CPU the scan's per-layer slicing costs more than it saves in compile time.
        model=llama(vocab_size=2048, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=384,
                    scan_layers=False),
        data=DataConfig(sources=("python_stdlib",), seq_len=128, max_bytes=12_000_000,
                        tokenizer_train_bytes=4_000_000),
        optim=OptimConfig(learning_rate=5e-3, warmup_steps=30),
        train=TrainConfig(steps=550, batch_size=32, eval_every=100, eval_batches=40),
    )
