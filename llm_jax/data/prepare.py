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

import dataclasses
import hashlib
import itertools
import json
import operator
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from llm_jax.config import Config, data_dir
from llm_jax.data.corpus import DataError, iter_documents
from llm_jax.data.tokenizer import Tokenizer, text_chunks, train_tokenizer

FORMAT = 1  # bump when the layout or the tokenization changes: old directories then stop matching
SHARD_TOKENS = 128 * 2**20
BATCH_BYTES = 4 * 2**20  # text handed to one multithreaded encode call
PROGRESS_BYTES = 8 * 2**20  # smaller corpora tokenize too fast to need a progress bar


class TokenArray:
    """Read-only 1-D tokens over memory-mapped shards: len(a), a[i], a[i:j] (a copy only across shards).

    Pickles as file names, so grain worker processes map the files themselves.
    """

    def __init__(self, paths: list[Path], lengths: list[int], dtype: str):
        self._paths = list(paths)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._starts = np.cumsum([0, *lengths], dtype=np.int64)
        self._maps = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("TokenArray slices take no step")
            return self._range(start, max(start, stop))
        i = operator.index(index)
        i += len(self) if i < 0 else 0
        if not 0 <= i < len(self):
            raise IndexError(f"token index {index} out of range for {len(self)} tokens")
        return self._range(i, i + 1)[0]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype=dtype)

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def _range(self, start: int, stop: int) -> np.ndarray:
        if self._maps is None:
            self._maps = [np.memmap(p, self.dtype, mode="r") for p in self._paths]
        parts = []
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            end = min(stop, int(self._starts[k + 1]))
            parts.append(self._maps[k][start - self._starts[k]:end - self._starts[k]])
            start, k = end, k + 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty(0, self.dtype)


class NpyRows:
    """Random-access rows over .npy arrays of equal length (one per key), memory-mapped on first use.

    Subclasses turn row i of every array into batch entries (`row(arrays, i)`). Pickles as file names, so
    grain worker processes map the files themselves.
    """

    def __init__(self, paths: dict[str, Path]):
        self.paths, self._arrays = paths, None

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {k: np.load(p, mmap_mode="r") for k, p in self.paths.items()}
        return self._arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays().values())))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        return self.row(self.arrays(), index)

    def row(self, arrays: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({next(iter(self.paths.values())).parent}, rows={len(self)})"


@dataclasses.dataclass(frozen=True)
class PreparedDir:
    """A directory of tokenized data: meta.json plus the tokenizer it was made with (pretraining or SFT)."""
    path: Path
    meta: dict
    tokenizer: Tokenizer

    @classmethod
    def load(cls, out_dir: str | Path):
        out_dir = Path(out_dir)
        if not (out_dir / "meta.json").is_file():
            raise DataError(f"{out_dir} holds no prepared data (no meta.json); prepare it first")
        meta = json.loads((out_dir / "meta.json").read_text())
        tokenizer = Tokenizer.load(out_dir / "tokenizer.model")
        if tokenizer.sha256 != meta["tokenizer_sha256"]:
            raise DataError(f"{out_dir}/tokenizer.model is not the tokenizer its meta.json was prepared with")
        return cls(out_dir, meta, tokenizer)

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.model"

    def check_seq_len(self, seq_len: int) -> None:
        """Data rendered into fixed rows (SFT, preference pairs) fits only the seq_len it was made for."""
        if seq_len != self.meta["seq_len"]:
            raise DataError(f"{self.path} was prepared for data.seq_len={self.meta['seq_len']}, not {seq_len}; "
                            "prepare it again for this seq_len")

    def nonempty(self, rows, split: str):
        if not len(rows):
            raise DataError(f"the {split} split of {self.path} is empty; use more data or change "
                            "data.eval_fraction")
        return rows


class Prepared(PreparedDir):
    """Pretraining token shards (train and eval splits)."""

    def train_tokens(self) -> TokenArray:
        return self._tokens("train")

    def eval_tokens(self) -> TokenArray:
        return self._tokens("eval")

    def _tokens(self, split: str) -> TokenArray:
        info = self.meta["splits"][split]
        return TokenArray([self.path / n for n in info["shards"]], info["shard_tokens"], self.meta["dtype"])


def prepare(cfg: Config, out_dir: Path) -> Prepared:
    """Tokenizes cfg's corpus into out_dir, or reuses what an identical data config left there."""
    out_dir = Path(out_dir)
    given = _given_tokenizer(cfg)
    meta = publish(out_dir, _fingerprint_fields(cfg, given),
                   lambda tmp: {"format": FORMAT, **_prepare_into(cfg, tmp, given)})
    if meta is None:
        print(f"reusing prepared data in {out_dir} (same data config)")
        return Prepared.load(out_dir)
    prepared = Prepared.load(out_dir)
    splits = prepared.meta["splits"]
    print(f"prepared {out_dir}: {meta['documents']} documents, {meta['text_bytes'] / 1e6:.1f} MB of text, "
          f"{splits['train']['tokens']} train + {splits['eval']['tokens']} eval tokens")
    return prepared


def publish(out_dir: Path, fields: dict, build: Callable[[Path], dict]) -> dict | None:
    """Writes a data directory under a temporary name and renames it into place, so a crash leaves nothing
    half-written. `build(tmp)` writes the files and returns the meta. Returns that meta, or None when
    out_dir already holds data made from the same `fields` (then nothing is rebuilt)."""
    fingerprint = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    if matches_fingerprint(out_dir, fingerprint, fields):
        return None
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        meta = {"fingerprint": fingerprint, "config": fields, **build(tmp)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        try:
            os.rename(tmp, out_dir)
        except OSError:  # another process published the same data first: use theirs
            if not matches_fingerprint(out_dir, fingerprint, fields):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def _given_tokenizer(cfg: Config) -> Tokenizer | None:
    if not cfg.data.tokenizer:
        return None
    tokenizer = Tokenizer.load(Path(cfg.data.tokenizer).expanduser())
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise DataError(f"data.tokenizer={cfg.data.tokenizer} has {tokenizer.vocab_size} pieces, more than "
                        f"model.vocab_size={cfg.model.vocab_size}")
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


def matches_fingerprint(out_dir: Path, fingerprint: str, fields: dict) -> bool:
    """True if out_dir holds data prepared with this fingerprint; False if it is absent or empty."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return False
    meta_path = out_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{out_dir} exists but holds no prepared data (no meta.json); pick another directory")
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") != fingerprint:
        old = meta.get("config", {})
        changed = sorted(k for k in {*old, *fields} if old.get(k) != fields.get(k))
        raise DataError(f"{out_dir} holds data prepared with a different config ({', '.join(changed)} differ); "
                        "pick another directory (data.prepared=...) or delete it")
    return True


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
    dtype = "uint16" if tokenizer.vocab_size <= 2**16 else "uint32"
    n_tokens = _tokenize(documents(), tokenizer, tmp / "stream.bin", np.dtype(dtype).newbyteorder("<"), n_bytes)
    n_eval = max(1, round(n_tokens * cfg.data.eval_fraction))
    stream = np.memmap(tmp / "stream.bin", np.dtype(dtype).newbyteorder("<"), mode="r")
    splits = {"train": _write_shards(stream[:n_tokens - n_eval], tmp, "train"),
              "eval": _write_shards(stream[n_tokens - n_eval:], tmp, "eval")}
    del stream
    os.remove(tmp / "stream.bin")
    return {"dtype": dtype, "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
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
