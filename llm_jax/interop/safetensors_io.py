"""Safetensors weights of a Hugging Face model directory, read with numpy alone (neither torch nor transformers).

A directory's weights are the files of its model.safetensors.index.json, else every *.safetensors in it;
pickle weights (*.bin, *.pt, ...) are refused, since loading them can run code. numpy has no bfloat16, so
bf16 tensors are widened to float32 by hand.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from llm_jax.errors import HFError


def safetensors_numpy():
    """safetensors' numpy API, or an HFError naming the extra to install."""
    try:
        import safetensors.numpy
    except ImportError:
        raise HFError("Hugging Face conversion needs the `safetensors` package: pip install -e '.[hf]'") from None
    return safetensors.numpy


def read_weights(hf_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor of the model directory `hf_dir` by its Hugging Face name, sharded or not."""
    weights = {}
    for path in _weight_files(hf_dir):
        weights.update(_read_safetensors(path))
    return weights


def _weight_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [hf_dir / n for n in names]
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise HFError(f"{hf_dir} has only pickle weights ({', '.join(pickles[:3])}), which are refused (loading "
                      "them can run code); convert them to .safetensors first")
    raise HFError(f"{hf_dir}: no *.safetensors weights")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    if not any(v.get("dtype") == "BF16" for k, v in header.items() if k != "__metadata__"):
        return safetensors_numpy().load_file(str(path))
    # numpy has no bfloat16: read the raw buffer and widen bf16 to float32 by hand.
    raw = np.memmap(path, np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = raw[start:end]
        if info["dtype"] == "BF16":
            arr = (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            dtypes = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
                      "U8": np.uint8, "BOOL": np.bool_}
            if info["dtype"] not in dtypes:
                raise HFError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
            arr = np.array(buf.view(dtypes[info["dtype"]]))
        out[name] = arr.reshape(info["shape"])
    return out
