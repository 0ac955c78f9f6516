"""Tokenizes a corpus once into binary token shards that every later run memory-maps.

A prepared directory holds:
  tokenizer.model            the sentencepiece model (trained on the corpus unless data.tokenizer names one)
  train-00000.bin ...        raw little-endian token ids: uint16 when the vocabulary fits, else uint32;
  eval-00000.bin ...         at most SHARD_TOKENS per shard
  meta.json                  dtype, tokens and shard names per split, tokenizer sha256, the config fingerprint
The documents, in corpus.iter_documents order and each followed by EOS, form one token stream; its LAST
data.eval_fraction of tokens is held out for evaluation (cut mid-document if it falls there). The directory
appears atomically (written beside it, then renamed) and is reused when the data config is unchanged.
"""
from __future__ import annotations

import itertools
import os
import platform
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from llm_jax.config import Config, data_dir
from llm_jax.data.corpus import iter_documents
from llm_jax.data.pipeline import PackedWindows
from llm_jax.data.shards import SPLITS, PreparedDir, TokenArray, token_dtype
from llm_jax.data.tokenizer import Tokenizer, check_fits, text_chunks, train_tokenizer
from llm_jax.errors import DataError

FORMAT = 1  # bump when the layout or the tokenization changes: old directories then stop matching
SHARD_TOKENS = 128 * 2**20
BATCH_BYTES = 4 * 2**20  # text handed to one multithreaded encode call
PROGRESS_BYTES = 8 * 2**20  # smaller corpora tokenize too fast to need a progress bar


class Prepared(PreparedDir):
    """Pretraining token shards (train and eval splits)."""
    KIND = "token shards"

    def tokens(self, split: str) -> TokenArray:
        info = self.meta["splits"][split]
        return TokenArray([self.path / n for n in info["shards"]], info["shard_tokens"], self.meta["dtype"])

    def rows(self, split: str, seq_len: int) -> PackedWindows:
        """The split's packed windows (data/pipeline.py), for any seq_len; a split shorter than one window is a
        DataError."""
        tokens = self.tokens(split)
        windows = PackedWindows(tokens, seq_len, self.tokenizer.byte_lengths(), self.tokenizer.eos_id)
        if not len(windows):
            fix = "raise data.eval_fraction" if split == "eval" else "use more data or a smaller data.eval_fraction"
            raise DataError(f"the {split} split of {self.path} has {len(tokens)} tokens, fewer than one window "
                            f"of data.seq_len+1={seq_len + 1}; {fix} or lower data.seq_len")
        return windows

    def expected_sizes(self) -> list[tuple[Path, int]]:
        itemsize = np.dtype(self.meta["dtype"]).itemsize
        return [(self.path / name, n * itemsize) for split in SPLITS
                for name, n in zip(self.meta["splits"][split]["shards"], self.meta["splits"][split]["shard_tokens"])]


def prepare(cfg: Config, out_dir: Path) -> None:
    """Tokenizes cfg's corpus into out_dir, unless an identical data config left it there (Prepared.load reads it)."""
    given = _given_tokenizer(cfg)

    def describe(meta: dict) -> str:
        splits = meta["splits"]
        return (f"prepared {out_dir}: {meta['documents']} documents, {meta['text_bytes'] / 1e6:.1f} MB of text, "
                f"{splits['train']['tokens']} train + {splits['eval']['tokens']} eval tokens")
    Prepared.publish(out_dir, _fingerprint_fields(cfg, given),
                     lambda tmp: {"format": FORMAT, **_prepare_into(cfg, tmp, given)}, describe)


def _given_tokenizer(cfg: Config) -> Tokenizer | None:
    if not cfg.data.tokenizer:
        return None
    tokenizer = Tokenizer.load(Path(cfg.data.tokenizer).expanduser())
    check_fits(tokenizer, cfg.model.vocab_size, f"data.tokenizer={cfg.data.tokenizer}")
    return tokenizer


def _fingerprint_fields(cfg: Config, given: Tokenizer | None) -> dict:
    d = cfg.data
    fields = {"format": FORMAT, "sources": list(d.sources), "data_dir": str(data_dir(cfg).resolve()),
              "max_bytes": d.max_bytes, "eval_fraction": d.eval_fraction, "vocab_size": cfg.model.vocab_size,
              "tokenizer": ({"sha256": given.sha256} if given else
                            {"type": d.tokenizer_type, "train_bytes": d.tokenizer_train_bytes})}
    if any(s.startswith("python_stdlib") for s in d.sources):
        fields["python"] = platform.python_version()  # the stdlib differs between versions
    return fields


def _prepare_into(cfg: Config, tmp: Path, tokenizer: Tokenizer | None) -> dict:
    def documents() -> Iterator[str]:
        return iter_documents(cfg.data.sources, data_dir(cfg), cfg.data.max_bytes)

    n_docs, n_bytes = 0, 0
    for text in documents():
        n_docs, n_bytes = n_docs + 1, n_bytes + len(text.encode())
    if tokenizer is None:
        sample = _spread(documents(), cfg.data.tokenizer_train_bytes / n_bytes)
        tokenizer = train_tokenizer(sample, tmp / "tokenizer", cfg.model.vocab_size, cfg.data.tokenizer_type,
                                    cfg.data.tokenizer_train_bytes)
    else:
        (tmp / "tokenizer.model").write_bytes(tokenizer.serialized())
    dtype = token_dtype(tokenizer.vocab_size).newbyteorder("<")
    n_tokens = _tokenize(documents(), tokenizer, tmp / "stream.bin", dtype, n_bytes)
    n_eval = max(1, round(n_tokens * cfg.data.eval_fraction))
    stream = np.memmap(tmp / "stream.bin", dtype, mode="r")
    splits = {"train": _write_shards(stream[:n_tokens - n_eval], tmp, "train"),
              "eval": _write_shards(stream[n_tokens - n_eval:], tmp, "eval")}
    del stream
    os.remove(tmp / "stream.bin")
    return {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "tokenizer_sha256": tokenizer.sha256, "documents": n_docs, "text_bytes": n_bytes, "splits": splits}


def _spread(documents: Iterable[str], keep: float) -> Iterator[str]:
    """About `keep` of the text, in chunks evenly spread over the corpus, so every source is sampled."""
    credit = 0.0
    for text in documents:
        for chunk in text_chunks(text):
            n = len(chunk.encode())
            credit += n * keep
            if credit >= n:
                credit -= n
                yield chunk


def _tokenize(documents: Iterable[str], tokenizer: Tokenizer, path: Path, dtype: np.dtype, n_bytes: int) -> int:
    """Writes every document's tokens and an EOS to path; returns the token count."""
    eos, n_tokens = (tokenizer.eos_id,), 0
    with open(path, "wb") as f, tqdm(total=n_bytes, unit="B", unit_scale=True, desc="tokenizing",
                                     disable=n_bytes < PROGRESS_BYTES) as bar:
        for batch, batch_bytes in _batches(documents):
            ids = tokenizer.encode_batch(batch)
            count = sum(len(d) for d in ids) + len(ids)
            tokens = np.fromiter(itertools.chain.from_iterable(itertools.chain(d, eos) for d in ids), dtype, count)
            f.write(tokens.tobytes())
            n_tokens += count
            bar.update(batch_bytes)
    return n_tokens


def _batches(documents: Iterable[str]) -> Iterator[tuple[list[str], int]]:
    batch, size = [], 0
    for text in documents:
        batch.append(text)
        size += len(text.encode())
        if size >= BATCH_BYTES:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


def _write_shards(tokens: np.ndarray, out: Path, split: str) -> dict:
    names, lengths = [], []
    for k, start in enumerate(range(0, len(tokens), SHARD_TOKENS)):
        names.append(f"{split}-{k:05d}.bin")
        shard = tokens[start:start + SHARD_TOKENS]
        shard.tofile(out / names[-1])
        lengths.append(len(shard))
    return {"tokens": int(sum(lengths)), "shards": names, "shard_tokens": lengths}
