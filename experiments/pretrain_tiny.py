"""The embedded default: a small Llama trained on this interpreter's standard library source.

No download: the corpus is `sysconfig.get_paths()["stdlib"]` (tests excluded), whole modules held out.
Sized by wall-clock, not steps: 210 s of training (train.time_budget_s; the step count is planned from the
measured step rate, about 4 minutes in all on 2 CPU cores), with what the recipe ablations measured best at
that scale (docs/recipe.md): Muon for the blocks' matrices, a ReLU² MLP, a 4096-piece vocabulary. Every
evaluation scores the whole held-out split, beside gzip, bz2 and xz alone and primed with the training text.
"""
from llm_jax.config import Config, DataConfig, OptimConfig, TrainConfig, llama


def config() -> Config:
    return Config(
        name="pretrain_tiny",
        # Unrolled layers: on CPU the scan's per-layer slicing costs more than it saves in compile time.
        # ReLU²'s d_ff 576 gives it SwiGLU's parameter count at d_ff 384 (two matrices instead of three).
        model=llama(vocab_size=4096, d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=576, mlp="relu2",
                    scan_layers=False),
        data=DataConfig(sources=("python_stdlib",), seq_len=128, max_bytes=12_000_000,
                        tokenizer_train_bytes=4_000_000),
        optim=OptimConfig(optimizer="muon", learning_rate=5e-3, warmup_steps=30),
        train=TrainConfig(time_budget_s=210, batch_size=32, eval_every=200, eval_batches=0),
    )
