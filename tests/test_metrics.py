import dataclasses
import math
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from llm_jax import compression, metrics
from llm_jax.config import ModelConfig


def _read(logdir):
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return acc


def test_writer_round_trip(tmp_path):
    writer = metrics.Writer(tmp_path, enabled=True)
    writer.scalars(10, {"train/loss_bits_per_token": 3.5, "perf/mfu": float("nan")})
    writer.scalars(20, {"train/loss_bits_per_token": np.float32(2.25)})
    writer.text("config", "| key | value |\n|---|---|\n| model.n_layers | 4 |")
    writer.close()

    acc = _read(tmp_path)
    loss = acc.Scalars("train/loss_bits_per_token")
    assert [(e.step, e.value) for e in loss] == [(10, 3.5), (20, 2.25)]
    assert math.isnan(acc.Scalars("perf/mfu")[0].value)
    (text,) = acc.Tensors("config")
    assert text.step == 0
    assert text.tensor_proto.string_val == [b"| key | value |\n|---|---|\n| model.n_layers | 4 |"]
    assert acc.SummaryMetadata("config").plugin_data.plugin_name == "text"


def test_disabled_writer_writes_nothing(tmp_path):
    logdir = tmp_path / "tb"
    writer = metrics.Writer(logdir, enabled=False)
    writer.scalars(1, {"train/loss": 1.0})
    writer.text("config", "hello")
    writer.flush()
    writer.close()
    assert not logdir.exists()


def test_flops_per_token_swiglu_untied():
    model = ModelConfig(vocab_size=32, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=6, d_ff=16,
                        mlp="swiglu", tie_embeddings=False)
    # q 8*2*6=96, k and v 8*1*6=48 each, o 2*6*8=96, MLP 3*8*16=384: 672 per layer; unembedding 32*8=256
    n = 2 * 672 + 256
    attention = 6 * 2 * 2 * 6 * 10  # 6 * layers * heads * head_dim * seq_len
    assert metrics.flops_per_token(model, seq_len=10) == 6 * n + attention == 11040


def test_flops_per_token_gelu_tied():
    model = ModelConfig(vocab_size=50, d_model=8, n_layers=3, n_heads=2, n_kv_heads=2, d_ff=32, mlp="gelu",
                        tie_embeddings=True, position="learned", use_bias=True)
    # head_dim 8/2=4: q, k, v, o 8*2*4=64 each; MLP 2*8*32=512: 768 per layer; unembedding 50*8=400
    n = 3 * 768 + 400
    attention = 6 * 3 * 2 * 4 * 6
    assert metrics.flops_per_token(model, seq_len=6) == 6 * n + attention == 17088
    untied = dataclasses.replace(model, tie_embeddings=False)
    assert metrics.flops_per_token(untied, seq_len=6) == 17088  # the output matmul runs either way


def test_param_count():
    params = {"a": np.zeros((3, 4)), "b": [np.zeros(5), {"c": np.zeros((2, 2, 2))}]}
    assert metrics.param_count(params) == 12 + 5 + 8


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5", 459.0), ("TPU v5p", 459.0),
    ("TPU v6 lite", 918.0), ("TPU v6e", 918.0), ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100-SXM4-40GB", 312.0), ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA H100 80GB HBM3", 989.0),
    ("nvidia h100 80gb hbm3", 989.0), ("NVIDIA H200", 989.0),
    ("cpu", None), ("TPU v4 lite", None), ("TPU7x", None), ("NVIDIA H100 PCIe", None),
    ("NVIDIA GeForce RTX 4090", None), ("", None),
])
def test_device_peak_tflops(kind, peak):
    assert metrics.device_peak_tflops(kind) == peak


def test_peak_override_wins():
    assert metrics.device_peak_tflops("cpu", override=100.0) == 100.0
    assert metrics.device_peak_tflops("TPU v4", override=0.0) == 275.0


def test_mfu():
    assert math.isnan(metrics.mfu(1000.0, 1e9, 2, None))
    # 1e3 tokens/s * 1e9 FLOPs = 1e12 FLOP/s against 2 devices * 100e12
    assert metrics.mfu(1000.0, 1e9, 2, 100.0) == pytest.approx(0.005)


def test_baselines():
    repetitive = b"the quick brown fox jumps over the lazy dog. " * 400
    low = compression.baselines(repetitive)
    assert set(low) == {"gzip", "bz2", "xz"}
    assert all(0 < v < 1 for v in low.values())
    high = compression.baselines(os.urandom(1 << 14))
    assert all(v > 7 for v in high.values())
    with pytest.raises(ValueError):
        compression.baselines(b"")


def test_format_comparison():
    table = compression.format_comparison(1.5, {"gzip": 3.0, "bz2": 2.4, "xz": 2.25})
    lines = table.splitlines()
    assert len(lines) == 5 and len({len(line) for line in lines}) == 1
    assert "xz -9e" in table and "2.00x" in table and "1.50x" in table
