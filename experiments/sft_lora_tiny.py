"""sft_tiny with LoRA adapters (rank 8 on the attention and MLP kernels): the same as
`--config sft_tiny --set peft.method=lora --set peft.rank=8`. Tests and smoke checks."""
import dataclasses

from llm_jax.config import Config, PeftConfig
from llm_jax.experiment import load_experiment


def config() -> Config:
    return dataclasses.replace(load_experiment("sft_tiny"), name="sft_lora_tiny",
                               peft=PeftConfig(method="lora", rank=8, alpha=16.0))
