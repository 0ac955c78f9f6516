"""sft_alpaca with LoRA (rank 8, alpha 16, the attention and MLP kernels and the output layer): only the adapters
train, the base export stays frozen and out of the checkpoints. Measured on pretrain_en_small's export, 300 steps
of 16 (docs/peft.md): LoRA wants a higher learning rate than full fine-tuning (B starts at zero and the update is
a product of two small matrices), 1e-2 the best of 1e-3, 3e-3, 1e-2 and 3e-2; and an adapter on the output layer
(which has to learn to predict the chat tokens the base never saw) took held-out bits/byte from 2.10 to 1.94.

`llm-jax train --config sft_alpaca_lora --set checkpoint.init_from=runs/en-small-export`, then
`llm-jax export --merge` for a whole model, or `llm-jax export-hf` for a Hugging Face PEFT adapter.
"""
import dataclasses

from llm_jax.config import Config, PeftConfig
from llm_jax.experiment import load_experiment


def config() -> Config:
    base = load_experiment("sft_alpaca")
    peft = PeftConfig(method="lora", rank=8, alpha=16.0, targets=r"(^|/)(q|k|v|o|gate|up|down|lm_head)/kernel$")
    return dataclasses.replace(base, name="sft_alpaca_lora", peft=peft,
                               optim=dataclasses.replace(base.optim, learning_rate=1e-2))
