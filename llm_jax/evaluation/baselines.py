"""General-purpose compressors as baselines for a language model's bits per byte.

A model that cannot beat `xz -9e` on held-out text has learnt little beyond repetition. xz at its
extreme preset manages a few MB/s, so pass a sample of the evaluation text, not a whole corpus.
"""
from __future__ import annotations

import bz2
import gzip
import lzma

LABELS = {"gzip": "gzip -9", "bz2": "bz2 -9", "xz": "xz -9e"}


def bits_per_byte(data: bytes) -> dict[str, float]:
    """Bits per byte of `data` under each compressor, container headers included."""
    if not data:
        raise ValueError("compression baselines need non-empty data")
    sizes = {
        "gzip": len(gzip.compress(data, compresslevel=9)),
        "bz2": len(bz2.compress(data, compresslevel=9)),
        "xz": len(lzma.compress(data, format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)),
    }
    return {name: 8 * size / len(data) for name, size in sizes.items()}


def format_comparison(model_bits_per_byte: float, baselines: dict) -> str:
    """An aligned console table; "vs model" is how many times more bits the row needs than the model."""
    rows = [("model", model_bits_per_byte)] + [(LABELS.get(k, k), v) for k, v in baselines.items()]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'':<{width}}  bits/byte  vs model"]
    for name, bpb in rows:
        ratio = f"{bpb / model_bits_per_byte:7.2f}x" if model_bits_per_byte > 0 else "       -"
        lines.append(f"{name:<{width}}  {bpb:9.3f}  {ratio}")
    return "\n".join(lines)
