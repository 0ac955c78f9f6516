"""Chinese: classical poetry and prose (chinese-poetry) plus modern Wikipedia paragraphs (CMRC 2018, DRCD)."""
from llm_jax.config import Config, DataConfig, OptimConfig, TrainConfig, llama


def config() -> Config:
    return Config(
        name="pretrain_chinese",
        # Unigram copes better than BPE with a large character inventory; byte fallback covers rare characters.
        model=llama(vocab_size=16384, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=1536),
        data=DataConfig(sources=("chinese_poetry:zh_chinese_poetry/**/*.json.gz",
                                 "squad:zh_wiki_cmrc2018_drcd/*.json.gz"),
                        seq_len=512, eval_fraction=0.05, tokenizer_type="unigram"),
        optim=OptimConfig(learning_rate=1e-3, warmup_steps=500),
        train=TrainConfig(steps=20_000, batch_size=64, eval_every=1000, eval_batches=64),
    )
