"""A small English base model on a CPU budget: the first stage of the pretrain -> SFT -> reward-model path.

About 3M parameters on 8 MB of Project Gutenberg, whole books held out (about 10% of the text); 9 minutes of
training (train.time_budget_s) with the recipe measured best on the embedded default (docs/recipe.md): Muon,
a ReLU² MLP (d_ff 768: SwiGLU's parameters at 512). Then
    llm-jax export --run-dir RUN --out EXPORT
    llm-jax train --config sft_dialogue --set checkpoint.init_from=EXPORT ...   (or go straight to rm_hh_rlhf)
"""
from llm_jax.config import Config, DataConfig, OptimConfig, TrainConfig, llama


def config() -> Config:
    return Config(
        name="pretrain_en_small",
        model=llama(vocab_size=4096, d_model=192, n_layers=4, n_heads=6, n_kv_heads=2, d_ff=768, mlp="relu2",
                    scan_layers=False),
        data=DataConfig(sources=("gutenberg:en_gutenberg/books/*.txt.gz",), seq_len=256, max_bytes=8_000_000,
                        tokenizer_train_bytes=4_000_000, eval_fraction=0.1),
        optim=OptimConfig(optimizer="muon", learning_rate=3e-3, warmup_steps=50),
        train=TrainConfig(time_budget_s=540, batch_size=16, eval_every=250, eval_batches=0),
    )
