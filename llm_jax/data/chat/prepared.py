"""What preparing chat-rendered data shares (SFT rows, preference pairs): the tokenizer, checked against the
model and told when it lacks chat tokens, and the data directory published with its fingerprint."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from llm_jax.config import Config, data_dir
from llm_jax.data.chat.template import chat_tags
from llm_jax.data.pieces import PieceTable
from llm_jax.data.shards import PreparedDir, publish
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import DataError


def publish_chat_data(cfg: Config, out_dir: Path, tokenizer: Tokenizer | str | Path, fmt: int,
                      prepare_into: Callable[[Config, Path, Tokenizer], dict], prepared: type[PreparedDir],
                      describe: Callable[[dict], str]):
    """Data rendered through the chat template (SFT, preference pairs) into out_dir with its tokenizer, by
    `prepare_into(cfg, tmp, tokenizer) -> meta`, unless out_dir already holds the same data config's; prints
    `describe(meta)` of what it made, and returns out_dir loaded as `prepared`."""
    tokenizer = chat_tokenizer(cfg, tokenizer)
    d = cfg.data
    fields = {"format": fmt, "sources": list(d.sources), "data_dir": str(data_dir(cfg).resolve()),
              "eval_fraction": d.eval_fraction, "seq_len": d.seq_len, "tokenizer_sha256": tokenizer.sha256}

    def build(tmp: Path) -> dict:
        (tmp / "tokenizer.model").write_bytes(tokenizer.serialized())
        return {"format": fmt, **prepare_into(cfg, tmp, tokenizer)}

    meta = publish(out_dir, fields, build, prepared.KIND)
    print(f"reusing prepared {prepared.KIND} in {out_dir} (same data config)" if meta is None else describe(meta))
    return prepared.load(out_dir)


def chat_tokenizer(cfg: Config, tokenizer: Tokenizer | str | Path) -> Tokenizer:
    """The tokenizer (loaded if given as a path), checked to fit the model. One without llm_jax's reserved
    chat tokens (an imported model's) gets text tags (template.chat_tags), and is told so."""
    if not isinstance(tokenizer, PieceTable):
        tokenizer = Tokenizer.load(Path(tokenizer).expanduser())
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} pieces, more than "
                        f"model.vocab_size={cfg.model.vocab_size}")
    if len(chat_tags(tokenizer)["user"]) > 1:
        print("the tokenizer has no chat tokens of its own: role tags are written as text (<|user|> ...) and a "
              "turn ends with EOS")
    return tokenizer
