"""What the tasks that learn from preference pairs (the reward model, DPO) share: the comparison data of
data/chat/preference.py, prepared once with the fine-tuned model's tokenizer, counted in pairs of two
sequences."""
from __future__ import annotations

from pathlib import Path

from llm_jax.data.chat import pairs, preference
from llm_jax.tasks.base import Task


class PreferenceTask(Task):
    loss, count = "loss", "pairs"
    counts = ("pairs",)
    progress = ("acc", "train/accuracy")
    sequences_per_example = 2
    source_kinds = tuple(pairs.LOADERS)
    needs_tokenizer = True
    renders_dialogues = True

    def prepare(self, out_dir: Path) -> None:
        preference.prepare_preference(self.cfg, out_dir, self.cfg.data.tokenizer)

    def step_shape(self) -> str:
        return f"{self.cfg.train.batch_size} pairs × 2×{self.cfg.data.seq_len} tokens/step"

    def describe(self, data) -> str:
        train, held = data.meta["splits"]["train"], data.meta["splits"]["eval"]
        return f"{train['pairs']:,} train / {held['pairs']:,} eval preference pairs"
