"""The classic Chinese dialogue GPT-2, briefly: SFT of an imported Chinese GPT-2 (a BERT vocab.txt) on
hikariming's Chinese Q&A through the `sep` template ([CLS] question [SEP] answer [SEP]), the format of the
dialogue-tuned GPT-2 of the classic demo. Run by examples/chinese_gpt2_demo.sh:

    llm-jax train --config sft_chinese_gpt2_demo --set checkpoint.init_from=EXPORT --run-dir DIR

A few minutes on 2 CPU cores (GPT-2 small's 102M parameters, 40 steps of 8 x 128 tokens): enough to see it
answer in the format, not to make a good assistant; raise train.steps on an accelerator.
"""
import dataclasses

from llm_jax.config import CheckpointConfig, DataConfig, OptimConfig, TrainConfig
from llm_jax.experiment import load_experiment


def config():
    base = load_experiment("sft_chinese")
    return dataclasses.replace(
        base, name="sft_chinese_gpt2_demo",
        data=DataConfig(sources=("alpaca:sft_zh_qa_hikariming/*.json",), seq_len=128, eval_fraction=0.03,
                        chat_template="sep"),
        optim=OptimConfig(learning_rate=1e-4, warmup_steps=5, weight_decay=0.0),
        train=TrainConfig(steps=40, batch_size=8, eval_every=40, eval_batches=2, log_every=5),
        checkpoint=CheckpointConfig(every=40))
