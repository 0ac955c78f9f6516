"""What preparing chat-rendered data shares (SFT rows, preference pairs): the tokenizer, checked against the
model and told when it lacks chat tokens, the seeded train/eval split, and the data directory published with
its fingerprint."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from llm_jax.config import Config, data_dir
from llm_jax.data.chat.template import DEFAULT, tags
from llm_jax.data.pieces import PieceTable
from llm_jax.data.shards import PreparedDir
from llm_jax.data.tokenizer import Tokenizer, check_fits
from llm_jax.errors import DataError

SPLIT_SEED = 0  # the train/eval split (and so SFT's packing order); fixed so that every run sees the same split


def publish_chat_data(cfg: Config, out_dir: Path, tokenizer: Tokenizer | str | Path, fmt: int,
                      prepare_into: Callable[[Config, Path, Tokenizer], dict], prepared: type[PreparedDir],
                      describe: Callable[[dict], str]) -> None:
    """Data rendered through the chat template (SFT, preference pairs) into out_dir with its tokenizer, by
    `prepare_into(cfg, tmp, tokenizer) -> meta`, unless out_dir already holds the same data config's; prints
    `describe(meta)` of what it made. `prepared.load(out_dir)` reads it."""
    tokenizer = chat_tokenizer(cfg, tokenizer)
    if note := tags(tokenizer, cfg.data.chat_template).note:  # also refuses a template the tokenizer cannot do
        print(note)
    d = cfg.data
    fields = {"format": fmt, "sources": list(d.sources), "data_dir": str(data_dir(cfg).resolve()),
              "eval_fraction": d.eval_fraction, "seq_len": d.seq_len, "tokenizer_sha256": tokenizer.sha256}
    if (d.chat_template or DEFAULT) != DEFAULT:  # absent for the default: directories from before templates match
        fields["chat_template"] = d.chat_template

    def build(tmp: Path) -> dict:
        (tmp / "tokenizer.model").write_bytes(tokenizer.serialized())
        return {"format": fmt, **prepare_into(cfg, tmp, tokenizer)}

    prepared.publish(Path(out_dir), fields, build, describe)


def check_template(meta: dict, cfg: Config, path: Path) -> None:
    """Data rendered through another chat template than cfg's is a DataError: the export would record one
    format and the model have learned another."""
    rendered, wanted = meta.get("config", {}).get("chat_template", DEFAULT), cfg.data.chat_template or DEFAULT
    if rendered != wanted:
        raise DataError(f"{path} was rendered with chat template {rendered}, this run's data.chat_template is "
                        f"{wanted}: prepare it with this config, or leave data.prepared unset")


def chat_tokenizer(cfg: Config, tokenizer: Tokenizer | str | Path) -> Tokenizer:
    """The tokenizer (loaded if given as a path), checked to fit the model."""
    if not isinstance(tokenizer, PieceTable):
        tokenizer = Tokenizer.load(Path(tokenizer).expanduser())
    check_fits(tokenizer, cfg.model.vocab_size, "the tokenizer")
    return tokenizer


def split_indices(n: int, eval_fraction: float) -> dict[str, np.ndarray]:
    """The indices of n items shuffled with the fixed SPLIT_SEED, by split: the LAST max(1, round(n *
    eval_fraction)) of that order are held out for eval, the rest are train, each split in that order."""
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_eval = max(1, round(n * eval_fraction))
    return {"train": order[:n - n_eval], "eval": order[n - n_eval:]}
