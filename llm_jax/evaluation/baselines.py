"""General-purpose compressors as baselines for a language model's bits per byte.

A model that cannot beat `xz -9e` on held-out text has learnt little beyond repetition. But the model has
read the training text and the compressor has not, so each compressor is also reported *primed*: given the
training text first, the bits it then adds for the held-out bytes, size(primer + data) - size(primer).
xz at its extreme preset manages a few MB/s, so pass a sample of the evaluation text, not a whole corpus;
`cached` stores the figures of one (held-out bytes, primer) pair beside the prepared data, so that the runs of
a sweep on one directory compress its primer once.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from llm_jax.atomic import write_atomic

LABELS = {"gzip": "gzip -9", "bz2": "bz2 -9", "xz": "xz -9e"}
PRIMED = "_primed"  # the suffix of a primed compressor's name: xz_primed
CACHE_VERSION = 1  # bump when what the figures mean changes: older cache files then stop matching

# A compressor only ever sees its own window, so it is primed with the tail of the training text that fits it:
# for xz (whose dictionary holds any primer up to 64 MiB whole) and gzip (up to where deflate ends its blocks),
# the bits it adds for the held-out bytes are then what priming with all the text gives, at a fraction of the cost.
GZIP_WINDOW = 32 * 2**10  # deflate's history
XZ_DICTIONARY = 64 * 2**20  # the dictionary of preset 9
# bzip2 at -9 compresses blocks of 900 kB independently (less 19 bytes of slack; its run-length pass before
# blocking never lengthens the input): the primer fills the block where the held-out bytes start.
BZ2_BLOCK = 9 * 100_000 - 19


def compressed_size(name: str, data: bytes) -> int:
    """Bytes of `data` under compressor `name`, container headers included."""
    if name == "gzip":
        return len(gzip.compress(data, compresslevel=9))
    if name == "bz2":
        return len(bz2.compress(data, compresslevel=9))
    return len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME))


def bits_per_byte(data: bytes) -> dict[str, float]:
    """Bits per byte of `data` under each compressor, container headers included."""
    if not data:
        raise ValueError("compression baselines need non-empty data")
    sizes = _sizes([(name, data) for name in LABELS])
    return {name: 8 * size / len(data) for name, size in zip(LABELS, sizes)}


class Primer:
    """Training text to prime the compressors with: each one's tail (what fits its window) and the compressed
    size of that tail alone, computed once for any number of held-out texts."""

    def __init__(self, text: bytes):
        self.text, self._alone = text, {}

    def tail(self, name: str, n_data: int) -> bytes:
        keep = {"gzip": GZIP_WINDOW, "xz": XZ_DICTIONARY, "bz2": max(0, BZ2_BLOCK - n_data)}[name]
        return self.text[len(self.text) - keep:] if keep else b""

    def primed_bits_per_byte(self, data: bytes) -> dict[str, float]:
        """Bits per byte of `data` under each compressor primed with this text (NAME_primed); an empty primer
        primes nothing: the plain figures."""
        if not self.text:
            return {name + PRIMED: bpb for name, bpb in bits_per_byte(data).items()}
        tails = {name: self.tail(name, len(data)) for name in LABELS}
        todo = [(name, tails[name]) for name in LABELS if (name, len(tails[name])) not in self._alone]
        sizes = _sizes([(name, tails[name] + data) for name in LABELS] + todo)
        for (name, tail), size in zip(todo, sizes[len(LABELS):]):
            self._alone[name, len(tail)] = size
        return {name + PRIMED: 8 * (size - self._alone[name, len(tails[name])]) / len(data)
                for name, size in zip(LABELS, sizes)}


def _sizes(jobs: list[tuple[str, bytes]]) -> list[int]:
    """compressed_size of each (name, data), in threads (the compressors release the GIL), the slow xz first."""
    order = sorted(range(len(jobs)), key=lambda i: jobs[i][0] != "xz")
    with ThreadPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
        sizes = dict(zip(order, pool.map(lambda i: compressed_size(*jobs[i]), order)))
    return [sizes[i] for i in range(len(jobs))]


def label(name: str) -> str:
    """How a table or plot names a compressor: "xz -9e", "xz -9e primed"."""
    base = name.removesuffix(PRIMED)
    return LABELS.get(base, base) + (" primed" if name.endswith(PRIMED) else "")


def cached(data: bytes, primer: bytes, cache_dir: Path | None) -> dict[str, float]:
    """bits_per_byte and the primed figures of `data`, read from or written to a small JSON file in cache_dir
    named by a hash of (data, the primer's tail that any compressor sees); a cache_dir that cannot be written
    (a read-only prepared directory) just goes without."""
    digest = hashlib.sha256(f"{CACHE_VERSION}:{len(data)}:".encode())
    digest.update(data)
    digest.update(primer[-XZ_DICTIONARY:])
    path = Path(cache_dir) / f"baselines-{digest.hexdigest()[:32]}.json" if cache_dir else None
    if path is not None and path.is_file():
        return json.loads(path.read_text())
    rates = {**bits_per_byte(data), **Primer(primer).primed_bits_per_byte(data)}
    if path is not None:
        try:  # a temporary of this process's own: runs of a sweep may write the same file at once
            write_atomic(path, json.dumps(rates, indent=2) + "\n", path.with_name(f".{path.name}.{os.getpid()}"))
        except OSError:
            pass
    return rates


def format_comparison(model_bits_per_byte: float, baselines: dict) -> str:
    """An aligned console table; "vs model" is how many times more bits the row needs than the model."""
    rows = [("model", model_bits_per_byte)] + [(label(k), v) for k, v in baselines.items()]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'':<{width}}  bits/byte  vs model"]
    for name, bpb in rows:
        ratio = f"{bpb / model_bits_per_byte:7.2f}x" if model_bits_per_byte > 0 else "       -"
        lines.append(f"{name:<{width}}  {bpb:9.3f}  {ratio}")
    return "\n".join(lines)
