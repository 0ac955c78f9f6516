"""Training FLOPs per token, the peak table, MFU, and the step timing of the training loop.

FLOPs per token — the reference for `perf/mfu`:

    flops_per_token = 6·N + 6·n_layers·n_heads·head_dim·T

N counts the matmul parameters, from the config rather than the parameter tree:

    N = n_layers·(d·H·hd            q projection
                  + 2·d·KV·hd       k and v projections
                  + H·hd·d          output projection
                  + m·d·ff)         MLP: m = 3 for SwiGLU (gate, up, down), 2 for GELU (up, down)
        + V·d                       unembedding, counted once even when tied to the input embedding
                                    (0 for a reward model: its head reads one token per sequence)

with d = d_model, H = n_heads, KV = n_kv_heads, hd = resolved_head_dim, ff = d_ff, V = vocab_size,
T = seq_len. 6·N is 2 FLOPs per multiply-add for the forward pass and twice that for the backward
pass. Left out: the input embedding and the learned position table (gathers, not matmuls), norm
scales and biases (O(d) per token each, negligible), softmax, activations and the loss.

The attention term: per token and layer the forward pass spends 2·T·H·hd FLOPs on QKᵀ and as much on
the weighted sum of V, 4·T·H·hd in all; the causal mask halves the keys attended on average, and the
backward pass doubles the forward, giving 3·(4·T·H·hd)/2 = 6·T·H·hd. It counts H query heads: grouped
KV heads shrink the projections but not these products. No remat recomputation is counted: this is
model FLOPs, so MFU measures useful work, not hardware utilisation.

MFU = tokens/s · flops_per_token / (n_devices · peak FLOP/s per device).
"""
from __future__ import annotations

import time

import jax
import numpy as np

from llm_jax.config import ModelConfig


def matmul_params(model: ModelConfig, unembed: bool = True) -> int:
    """N of the module docstring; `unembed`: the model ends in the output layer over the vocabulary."""
    d, hd = model.d_model, model.resolved_head_dim
    attention = d * model.n_heads * hd + 2 * d * model.n_kv_heads * hd + model.n_heads * hd * d
    mlp = (3 if model.mlp == "swiglu" else 2) * d * model.d_ff
    return model.n_layers * (attention + mlp) + (model.vocab_size * d if unembed else 0)


def flops_per_token(model: ModelConfig, seq_len: int, unembed: bool = True) -> float:
    """Training (forward + backward) FLOPs per token; see the module docstring."""
    attention = 6 * model.n_layers * model.n_heads * model.resolved_head_dim * seq_len
    return float(6 * matmul_params(model, unembed) + attention)


def param_count(params) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(params)))


# Dense (no sparsity) bf16 peak per chip, in TFLOP/s.
PEAK_TFLOPS = {
    "v4": 275.0,    # cloud.google.com/tpu/docs/v4: "Peak compute per chip (bf16) 275 TFLOPs"
    "v5e": 197.0,   # cloud.google.com/tpu/docs/v5e: "Peak compute per chip (bf16) 197 TFLOPs"
    "v5p": 459.0,   # cloud.google.com/tpu/docs/v5p: "Peak compute per chip (bf16) 459 TFLOPs"
    "v6e": 918.0,   # cloud.google.com/tpu/docs/v6e (Trillium): "Peak compute per chip (bf16) 918 TFLOPs"
    "a100": 312.0,  # NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS (624 with sparsity), SXM and PCIe
    "h100": 989.0,  # NVIDIA H100 datasheet, SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity, half dense
    "h200": 989.0,  # NVIDIA H200 datasheet, SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity, half dense
}

# jax `device.device_kind` substrings (lower case), first match wins; None: a chip we have no number for.
# TPU strings as jax reports them ("TPU v5 lite" is v5e, "TPU v5" is v5p, "TPU v6 lite" is v6e), hence
# the lite and v4i entries before their prefixes. H100/H200 PCIe and NVL parts run slower than the SXM
# numbers above, so they get None rather than a wrong MFU; train.peak_tflops covers them. "NVIDIA GH200"
# matches h200: its GPU has the same dense bf16 peak (GH200 datasheet: 990 TFLOPS).
_DEVICE_KINDS = (
    ("tpu v4 lite", None), ("tpu v4i", None), ("tpu v4", "v4"),
    ("tpu v5 lite", "v5e"), ("tpu v5e", "v5e"), ("tpu v5p", "v5p"), ("tpu v5", "v5p"),
    ("tpu v6 lite", "v6e"), ("tpu v6e", "v6e"),
    ("a100", "a100"),
    ("pcie", None), ("nvl", None), ("h100", "h100"), ("h200", "h200"),
)


def device_peak_tflops(device_kind: str, override: float = 0.0) -> float | None:
    """Per-device dense bf16 peak in TFLOP/s: `override` when positive, else the table; None if unknown
    (CPU included)."""
    if override > 0:
        return float(override)
    kind = " ".join(device_kind.lower().split())
    for pattern, chip in _DEVICE_KINDS:
        if pattern in kind:
            return None if chip is None else PEAK_TFLOPS[chip]
    return None


def mfu(tokens_per_sec: float, flops_per_token: float, n_devices: int, peak_tflops: float | None) -> float:
    """Model FLOPs utilisation as a fraction; NaN when the peak is unknown."""
    if peak_tflops is None or peak_tflops <= 0:
        return float("nan")
    return tokens_per_sec * flops_per_token / (n_devices * peak_tflops * 1e12)


class PerfMeter:
    """Step time, tokens/s and MFU over windows of steps, skipping the window holding compilation."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_tflops: float = 0.0):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak = device_peak_tflops(jax.devices()[0].device_kind, peak_tflops)
        self.n_devices = jax.device_count()
        self.t0, self.step0 = None, None
        self.last: dict[str, float] = {}

    def update(self, step_done: int) -> dict[str, float]:
        now = time.perf_counter()
        out = {}
        if self.t0 is not None and step_done > self.step0:
            step_time = (now - self.t0) / (step_done - self.step0)
            tokens_per_sec = self.tokens_per_step / step_time
            out = {"perf/step_time_s": step_time, "perf/tokens_per_sec": tokens_per_sec,
                   "perf/mfu": mfu(tokens_per_sec, self.flops_per_token, self.n_devices, self.peak)}
            self.last = out
        self.t0, self.step0 = now, step_done
        return out
