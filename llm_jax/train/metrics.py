"""The peak table, MFU and the step timing of the training loop.

MFU = tokens/s · flops_per_token / (n_devices · peak FLOP/s per device), with the model's FLOPs per token
from model/flops.py (the task's, tasks/base.Task.flops_per_token) and the dense bf16 peak below.
"""
from __future__ import annotations

import time

import jax
import numpy as np


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

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_tflops: float = 0.0,
                 throughput: str = "perf/tokens_per_sec"):
        self.tokens_per_step, self.flops_per_token, self.throughput = tokens_per_step, flops_per_token, throughput
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
            out = {"perf/step_time_s": step_time, self.throughput: tokens_per_sec,
                   "perf/mfu": mfu(tokens_per_sec, self.flops_per_token, self.n_devices, self.peak)}
            self.last = out
        self.t0, self.step0 = now, step_done
        return out

    def exclude(self, seconds: float) -> None:
        """Leaves `seconds` of the current window out of step time (a rollout that produced the batch)."""
        if self.t0 is not None:
            self.t0 += seconds
