"""A small English base model on a CPU budget: the first stage of the pretrain -> SFT -> reward-model path.

About 3M parameters on 8 MB of Project Gutenberg; ~10 minutes on 2 CPU cores. Then
    llm-jax export --run-dir RUN --out EXPORT
    llm-jax train --config sft_dialogue --set checkpoint.init_from=EXPORT ...   (or go straight to rm_hh_rlhf)
"""
from llm_jax.config import Config, DataConfig, OptimConfig, TrainConfig, llama


def config() -> Config:
    return Config(
        name="pretrain_en_small",
        model=llama(vocab_size=4096, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, d_ff=512, scan_layers=False),
        data=DataConfig(sources=("gutenberg:en_gutenberg/books/*.txt.gz",), seq_len=256, max_bytes=8_000_000,
                        tokenizer_train_bytes=4_000_000, eval_fraction=0.02),
        optim=OptimConfig(learning_rate=3e-3, warmup_steps=50),
        train=TrainConfig(steps=600, batch_size=16, eval_every=200, eval_batches=16),
    )
