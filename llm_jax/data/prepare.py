"""Tokenizes a corpus once into binary token shards that every later run memory-maps.

A prepared directory holds:
  tokenizer.model            the sentencepiece model (trained on the corpus unless data.tokenizer names one)
  train-00000.bin ...        raw little-endian token ids: uint16 when the vocabulary fits, else uint32;
  eval-00000.bin ...         at most SHARD_TOKENS per shard
  meta.json                  dtype, tokens, shard names, documents and text bytes per split, tokenizer sha256,
                             the config fingerprint
Held out for evaluation: whole documents, about data.eval_fraction of the corpus bytes, spread over the corpus
(held_out_documents: one document chosen with the fixed SPLIT_SEED in each stretch of the corpus, not train.seed,
so that every run of a sweep over seeds shares one split). A corpus of one document (Tiny Shakespeare) is
instead cut, nanoGPT's way: its last data.eval_fraction of bytes is held out, from the first token that starts
there. Each split is its documents in corpus.iter_documents order, each followed by EOS; the tokenizer (when
trained here) sees the train text only. The directory appears atomically (written beside it, then renamed) and
is reused when the data config is unchanged.
"""
from __future__ import annotations

import contextlib
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

FORMAT = 2  # bump when the layout or the tokenization changes: old directories then stop matching
SHARD_TOKENS = 128 * 2**20
BATCH_BYTES = 4 * 2**20  # text handed to one multithreaded encode call
PROGRESS_BYTES = 8 * 2**20  # smaller corpora tokenize too fast to need a progress bar
TAIL_TOKENS = 2**22  # tokens read at a time for Prepared.text_tail
SPLIT_SEED = 0  # which documents are held out; fixed so that every run on a corpus is scored on the same ones


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

    def text_tail(self, split: str, max_bytes: int) -> bytes:
        """The last max_bytes of the split's text (its documents' UTF-8 bytes, one after the other), read back
        from the tokens, from the end, TAIL_TOKENS at a time: the end of a large corpus costs no more."""
        tokens, lengths = self.tokens(split), self.tokenizer.byte_lengths()
        start, n_bytes = len(tokens), 0
        while start > 0 and n_bytes < max_bytes:
            first = max(0, start - TAIL_TOKENS)
            n_bytes, start = n_bytes + int(lengths[tokens[first:start]].sum()), first
        return self.tokenizer.decode_bytes(tokens[start:])[-max_bytes:]

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
                f"{splits['train']['tokens']} train + {splits['eval']['tokens']} eval tokens "
                f"(held out: {meta['held_out']}, {splits['eval']['text_bytes']:,} bytes)")
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

    fraction = cfg.data.eval_fraction
    sizes = np.fromiter((len(text.encode()) for text in documents()), np.int64)
    held = held_out_documents(sizes, fraction)
    head = _head(next(documents()), fraction) if len(sizes) == 1 else None
    if tokenizer is None:
        train_texts = [head] if head is not None else (t for t, h in zip(documents(), held) if not h)
        train_bytes = len(head.encode()) if head is not None else int(sizes[~held].sum())
        sample = _spread(train_texts, cfg.data.tokenizer_train_bytes / train_bytes)
        tokenizer = train_tokenizer(sample, tmp / "tokenizer", cfg.model.vocab_size, cfg.data.tokenizer_type,
                                    cfg.data.tokenizer_train_bytes)
    else:
        (tmp / "tokenizer.model").write_bytes(tokenizer.serialized())
    dtype = token_dtype(tokenizer.vocab_size).newbyteorder("<")
    paths = {split: tmp / f"{split}.stream" for split in SPLITS}
    _tokenize(zip(documents(), held), tokenizer, paths, dtype, int(sizes.sum()))
    if head is None:
        streams = {split: np.memmap(path, dtype, mode="r") for split, path in paths.items()}
        masks = {"train": ~held, "eval": held}
        counts = {split: (int(mask.sum()), int(sizes[mask].sum())) for split, mask in masks.items()}
    else:
        streams, counts = _cut_tail(np.memmap(paths["train"], dtype, mode="r"), tokenizer, len(head.encode()),
                                    int(sizes[0]))
    splits = {split: {**_write_shards(streams[split], tmp, split), "documents": counts[split][0],
                      "text_bytes": counts[split][1]} for split in SPLITS}
    del streams
    for path in paths.values():
        os.remove(path)
    return {"dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
            "tokenizer_sha256": tokenizer.sha256, "documents": len(sizes), "text_bytes": int(sizes.sum()),
            "held_out": "whole documents" if head is None else "the tail of the one document", "splits": splits}


def held_out_documents(sizes: np.ndarray, fraction: float) -> np.ndarray:
    """Which documents (of these UTF-8 sizes, in corpus order) are held out: in order, documents join a stretch
    until `fraction` of the bytes seen (less what was held out) reaches the mean size of the stretch's documents;
    then one of the stretch, drawn with SPLIT_SEED, is held out and a new stretch starts. Held-out bytes thus
    follow `fraction` of the bytes seen all along the corpus, in whole documents. At least one document is held
    out, and never all (fraction < 1: the first stretch has two documents or more); a single document is not
    held out (prepare cuts it instead, see the module doc)."""
    rng = np.random.default_rng(SPLIT_SEED)
    held = np.zeros(len(sizes), bool)
    if len(sizes) < 2:
        return held
    credit, start, stretch_bytes = 0.0, 0, 0
    for i, size in enumerate(sizes.tolist()):
        credit += fraction * size
        stretch_bytes += size
        if credit * (i + 1 - start) >= stretch_bytes:
            pick = int(rng.integers(start, i + 1))
            held[pick] = True
            credit -= sizes[pick]
            start, stretch_bytes = i + 1, 0
    if not held.any():
        held[rng.integers(len(sizes))] = True
    return held


def _head(text: str, fraction: float) -> str:
    """The first 1 - fraction of text's UTF-8 bytes, cut back to a character boundary."""
    raw = text.encode()
    return raw[:int(len(raw) * (1 - fraction))].decode("utf-8", errors="ignore")


def _cut_tail(stream: np.ndarray, tokenizer: Tokenizer, head_bytes: int, n_bytes: int) -> tuple[dict, dict]:
    """One document's token stream cut at its first token that starts at or after head_bytes (the tokenizer's
    text ends there), leaving a token on either side: the splits and their (documents, text bytes)."""
    ends = np.cumsum(tokenizer.byte_lengths()[stream], dtype=np.int64)  # token i ends where token i + 1 starts
    cut = min(max(1, int(np.searchsorted(ends, head_bytes, side="left")) + 1), len(stream) - 1)
    cut_bytes = int(ends[cut - 1])
    return {"train": stream[:cut], "eval": stream[cut:]}, {"train": (1, cut_bytes), "eval": (1, n_bytes - cut_bytes)}


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


def _tokenize(documents: Iterable[tuple[str, bool]], tokenizer: Tokenizer, paths: dict[str, Path], dtype: np.dtype,
              n_bytes: int) -> None:
    """Writes the tokens of every (document, held out) and an EOS to paths["eval"] if held out, else
    paths["train"]."""
    eos = (tokenizer.eos_id,)
    with contextlib.ExitStack() as stack, tqdm(total=n_bytes, unit="B", unit_scale=True, desc="tokenizing",
                                               disable=n_bytes < PROGRESS_BYTES) as bar:
        files = {split: stack.enter_context(open(path, "wb")) for split, path in paths.items()}
        for batch, batch_bytes in _batches(documents):
            ids = tokenizer.encode_batch([text for text, _ in batch])
            for split, held in (("train", False), ("eval", True)):
                chosen = [d for d, (_, h) in zip(ids, batch) if h == held]
                count = sum(len(d) for d in chosen) + len(chosen)
                tokens = np.fromiter(itertools.chain.from_iterable(itertools.chain(d, eos) for d in chosen), dtype,
                                     count)
                files[split].write(tokens.tobytes())
            bar.update(batch_bytes)


def _batches(documents: Iterable[tuple[str, bool]]) -> Iterator[tuple[list[tuple[str, bool]], int]]:
    batch, size = [], 0
    for text, held in documents:
        batch.append((text, held))
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
