"""The weights of a Hugging Face model directory as numpy arrays: safetensors, else PyTorch pickles read safely.

A directory's weights are, in this order of preference, the files of its model.safetensors.index.json, every
*.safetensors in it, the files of its pytorch_model.bin.index.json, or its pytorch_model.bin. Safetensors are
read with numpy alone (neither torch nor transformers). Pickles are read with PyTorch's weights-only unpickler
(torch.load(weights_only=True), memory-mapped): state dicts of tensors load, and a file that needs a full
unpickler (any other object, which loading could run code through) is refused; non-tensor entries (a version
int) are skipped. Other pickles (*.pt, *.pth, training_args.bin) are never read. numpy has no bfloat16, so
bf16 tensors are widened to float32; other dtypes are kept (the converter widens them one by one).
"""
from __future__ import annotations

import json
import re
import struct
import zipfile
from pathlib import Path

import numpy as np

from llm_jax.errors import HFError

# (index file, the single-file weights it shards), most preferred first
_LAYOUTS = (("model.safetensors.index.json", "*.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin"))


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
        weights.update(_read_safetensors(path) if path.suffix == ".safetensors" else _read_pickle(path))
    return weights


def _weight_files(hf_dir: Path) -> list[Path]:
    for index, pattern in _LAYOUTS:
        if (hf_dir / index).is_file():
            try:
                names = set(json.loads((hf_dir / index).read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise HFError(f"{hf_dir / index}: not a weight index ({type(e).__name__}: {e})") from None
            files = [hf_dir / n for n in sorted(names)]
            missing = [p.name for p in files if not p.is_file()]
            if missing:
                raise HFError(f"{hf_dir / index} names {len(missing)} missing weight files, e.g. {missing[0]}")
            return files
        files = sorted(hf_dir.glob(pattern))
        if files:
            return files
    raise HFError(f"{hf_dir}: no weights (*.safetensors or pytorch_model.bin, sharded or not)")


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


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise HFError(f"{path.name} is a PyTorch pickle, which needs torch: pip install -e '.[hf]'") from None
    import pickle
    try:
        # only the zip format (torch >= 1.6) can be memory-mapped; older files are read whole
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        what = re.search(r"GLOBAL [\w.]+|Unsupported operand \d+", str(e))
        raise HFError(f"{path}: needs a full unpickler ({what.group() if what else 'not plain tensors'}), which is "
                      "refused since loading it could run code; convert it to safetensors from a source you "
                      "trust") from None
    except Exception as e:  # a truncated file, a bad zip
        detail = str(e).partition("\n")[0] or type(e).__name__
        raise HFError(f"{path}: not a PyTorch checkpoint ({detail})") from None
    if not isinstance(state, dict):
        raise HFError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    out = {}
    for name, t in state.items():
        if isinstance(t, torch.Tensor):
            try:
                out[name] = (t.float() if t.dtype == torch.bfloat16 else t).numpy()
            except TypeError:
                raise HFError(f"{path.name}: tensor {name} has unsupported dtype {t.dtype}") from None
    return out
