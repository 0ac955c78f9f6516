"""Supervised fine-tuning: next-token prediction on dialogues, the loss on the assistant's tokens only.

Data: data/chat/sft.py renders each dialogue through data.chat_template and packs whole dialogues into
rows (weights 1 exactly on assistant tokens and the token that closes their turn: <|end|>, [SEP] or
<|im_end|>). The objective and scalars are pretraining's (tasks/pretrain.NextToken), counted over assistant
tokens. The model, tokenizer and template come from the export named by checkpoint.init_from (or
data.tokenizer names a tokenizer).
"""
from __future__ import annotations

from pathlib import Path

from llm_jax.data.chat import dialogue, sft
from llm_jax.tasks.pretrain import NextToken


class SFT(NextToken):
    name = "sft"
    source_kinds = tuple(dialogue.LOADERS)
    prepared_type = sft.PreparedSFT
    needs_tokenizer = True
    renders_dialogues = True

    def prepare(self, out_dir: Path) -> None:
        sft.prepare_sft(self.cfg, out_dir, self.cfg.data.tokenizer)

    def describe(self, data: sft.PreparedSFT) -> str:
        train, held = data.meta["splits"]["train"], data.meta["splits"]["eval"]
        return (f"{train['rows']:,} train / {held['rows']:,} eval rows of packed dialogues "
                f"({train['assistant_tokens']:,} assistant tokens to train on)")

