"""LoRA adapters in Hugging Face PEFT's format, both ways (GPT-2 and the Llama family, Qwen2 included: its q/k/v
biases belong to the frozen base, so its adapters are Llama's).

    export_adapter(RUN_DIR, OUT)   a peft.method=lora run's adapters -> adapter_config.json and
                                   adapter_model.safetensors, which `peft.PeftModel.from_pretrained(base, OUT)`
                                   loads onto the base exported with `llm-jax export-hf`.
    fold_adapter(weights, DIR)     an HF base model's weights with a PEFT LoRA adapter directory folded in
                                   (W + B·A·alpha/r), for `llm-jax import-hf BASE OUT --adapter DIR`.

PEFT stores lora_A as (r, in) and lora_B as (out, r) per torch module. GPT-2 packs q, k and v into one c_attn:
llm_jax's three adapters of rank r become one of rank 3r there (A stacked, B block-diagonal), the same update.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from llm_jax.errors import HFError
from llm_jax.interop.safetensors_io import safetensors_numpy

_PREFIX = "base_model.model."
# llm_jax module -> (HF module under a layer) per family
_LLAMA = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_GPT2 = {"o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"}


def _torch_pair(lora: dict) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A (r, in), lora_B (out, r)) of one llm_jax adapter (A (*in, r), B (r, *out))."""
    a, b = np.asarray(lora["lora_a"], np.float32), np.asarray(lora["lora_b"], np.float32)
    r = a.shape[-1]
    return a.reshape(-1, r).T, b.reshape(r, -1).T


def adapter_weights(family: str, layers: list[dict], lm_head: dict | None, rank: int):
    """PEFT's tensors by name and the rank_pattern of GPT-2's packed c_attn, from unstacked llm_jax layers."""
    tensors, ranks = {}, {}
    model, mapping = ("transformer.h", _GPT2) if family == "gpt2" else ("model.layers", _LLAMA)
    for i, layer in enumerate(layers):
        modules = {**layer.get("attn", {}), **layer.get("mlp", {})}
        for name, hf in mapping.items():
            if "lora_a" in modules.get(name, {}):
                tensors[f"{model}.{i}.{hf}"] = _torch_pair(modules[name])
        if family == "gpt2" and any("lora_a" in modules.get(x, {}) for x in "qkv"):
            d = next(int(np.prod(modules[x]["lora_b"].shape[1:])) for x in "qkv" if "lora_a" in modules.get(x, {}))
            a_cat, b_cat = np.zeros((3 * rank, d), np.float32), np.zeros((3 * d, 3 * rank), np.float32)
            for j, x in enumerate("qkv"):
                if "lora_a" in modules.get(x, {}):
                    a, b = _torch_pair(modules[x])
                    a_cat[j * rank:(j + 1) * rank], b_cat[j * d:(j + 1) * d, j * rank:(j + 1) * rank] = a, b
            tensors[f"{model}.{i}.attn.c_attn"] = (a_cat, b_cat)
            ranks[f"{model}.{i}.attn.c_attn"] = 3 * rank
    if lm_head and "lora_a" in lm_head:
        tensors["lm_head"] = _torch_pair(lm_head)
    return tensors, ranks


def write_adapter(out: Path, family: str, tensors: dict, ranks: dict, rank: int, alpha: float, base: str) -> dict:
    """adapter_config.json and adapter_model.safetensors into the (new) directory out."""
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": sorted(tensors), "bias": "none", "fan_in_fan_out": family == "gpt2",
              "rank_pattern": ranks, "alpha_pattern": {k: alpha * r / rank for k, r in ranks.items()},
              "use_rslora": False, "use_dora": False, "modules_to_save": None, "inference_mode": True,
              "base_model_name_or_path": base}
    flat = {f"{_PREFIX}{module}.lora_{ab}.weight": np.ascontiguousarray(w)
            for module, pair in tensors.items() for ab, w in zip("AB", pair)}
    safetensors_numpy().save_file(flat, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return config


def _pattern(patterns: dict, module: str, default):
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def fold_adapter(weights: dict[str, np.ndarray], adapter_dir: Path, kind: str) -> dict[str, np.ndarray]:
    """The base weights with the LoRA adapter in adapter_dir added in; anything else in it is refused."""
    cfg_path, tensors_path = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not tensors_path.is_file():
        raise HFError(f"{adapter_dir} is not a PEFT adapter directory (adapter_config.json and "
                      "adapter_model.safetensors)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora") or cfg.get("modules_to_save") or \
            cfg.get("bias", "none") != "none":
        raise HFError(f"{cfg_path}: only plain LoRA adapters fold in (peft_type LORA, no DoRA, bias or "
                      "modules_to_save)")
    lora = safetensors_numpy().load_file(str(tensors_path))
    weights = dict(weights)
    for key in sorted(k for k in lora if k.endswith(".lora_A.weight")):
        module = key[len(_PREFIX):-len(".lora_A.weight")] if key.startswith(_PREFIX) else key[:-len(".lora_A.weight")]
        a, b = lora.pop(key).astype(np.float32), lora.pop(key.replace(".lora_A.", ".lora_B."), None)
        if b is None:
            raise HFError(f"{tensors_path}: {key} has no lora_B")
        r, alpha = _pattern(cfg.get("rank_pattern") or {}, module, cfg["r"]), \
            _pattern(cfg.get("alpha_pattern") or {}, module, cfg["lora_alpha"])
        delta = (alpha / (r ** 0.5 if cfg.get("use_rslora") else r)) * (b.astype(np.float32) @ a)
        name = next((n for n in (f"{module}.weight", f"{module.split('.', 1)[-1]}.weight") if n in weights), None)
        if name is None:
            raise HFError(f"{tensors_path}: {module} is not a weight of the base model")
        # GPT-2's Conv1D weights are (in, out); torch Linear's (out, in)
        weights[name] = weights[name].astype(np.float32) + (delta.T if kind == "gpt2" else delta)
    if lora:
        raise HFError(f"{tensors_path}: {len(lora)} tensors are not LoRA pairs, e.g. {sorted(lora)[0]}")
    return weights
