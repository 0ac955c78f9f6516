import dataclasses
import math
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.summary.writer import event_file_writer
from tensorboard.util import tensor_util

from llm_jax.config import Config, ModelConfig, PeftConfig, TrainConfig
from llm_jax.evaluation import baselines
from llm_jax.tasks.pretrain import Pretrain
from llm_jax.tasks.reward import RewardModel
from llm_jax.model import flops
from llm_jax.train import events, metrics


def _read(logdir):
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return acc


def test_writer_round_trip(tmp_path):
    writer = events.Writer(tmp_path, enabled=True)
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
    writer = events.Writer(logdir, enabled=False)
    writer.scalars(1, {"train/loss": 1.0})
    writer.text("config", "hello")
    writer.flush()
    writer.close()
    assert not logdir.exists()


def _train(logdir, steps, offset, resume_step=None, config=False):
    """A run that logs loss = offset + step, as a killed or resumed training job would."""
    writer = events.Writer(logdir, enabled=True, resume_step=resume_step)
    if config:
        writer.text("config", "hello")
    for step in steps:
        writer.scalars(step, {"train/loss": offset + step})
    writer.close()


def _event_files(logdir):
    return sorted(logdir.glob("events.out.tfevents.*"))


def _raw_points(logdir, tag):
    """(step, value) of every `tag` point in every event file, read without EventAccumulator."""
    return sorted((event.step, tensor_util.make_ndarray(value.tensor).item())
                  for path in _event_files(logdir) for event in EventFileLoader(str(path)).Load()
                  for value in event.summary.value if value.tag == tag)


def _assert_one_curve(logdir, new_offset):
    """Steps 1..12 once each: 1..6 from the killed run, 7..12 from the latest resumed one; config kept."""
    expected = [(s, float(s)) for s in range(1, 7)] + [(s, float(new_offset + s)) for s in range(7, 13)]
    acc = EventAccumulator(str(logdir), purge_orphaned_data=False)
    acc.Reload()
    assert sorted((e.step, e.value) for e in acc.Scalars("train/loss")) == expected
    assert _raw_points(logdir, "train/loss") == expected
    (text,) = acc.Tensors("config")
    assert (text.step, text.tensor_proto.string_val) == (0, [b"hello"])
    assert _raw_points(logdir, "config") == [(0, b"hello")]


def test_resume_cuts_points_past_the_checkpoint(tmp_path):
    _train(tmp_path, range(1, 11), offset=0, config=True)
    _train(tmp_path, range(7, 13), offset=100, resume_step=6)
    _assert_one_curve(tmp_path, new_offset=100)
    # Killed again before the next checkpoint: resuming from the same step is idempotent.
    _train(tmp_path, range(7, 13), offset=200, resume_step=6)
    _assert_one_curve(tmp_path, new_offset=200)
    assert sorted(tmp_path.iterdir()) == _event_files(tmp_path)  # no temporary left behind


def test_resume_after_a_crash_mid_rewrite(tmp_path):
    # Killed before os.replace: the old file is whole and a partial temporary lies beside it.
    _train(tmp_path, range(1, 11), offset=0, config=True)
    (old,) = _event_files(tmp_path)
    stale = old.with_name("." + old.name.replace("tfevents", "rewrite"))
    stale.write_bytes(b"partial")
    _train(tmp_path, range(7, 13), offset=100, resume_step=6)
    _assert_one_curve(tmp_path, new_offset=100)
    assert not stale.exists()


def test_resume_leaves_files_with_nothing_to_cut_untouched(tmp_path):
    _train(tmp_path, range(1, 11), offset=0)
    (old,) = _event_files(tmp_path)
    before = (old.read_bytes(), old.stat().st_mtime_ns)
    _train(tmp_path, [], offset=0, resume_step=10)
    assert (old.read_bytes(), old.stat().st_mtime_ns) == before
    assert len(_event_files(tmp_path)) == 2


def test_resume_never_reuses_a_file_name(tmp_path, monkeypatch):
    # A restart in the same second with the same pid (pid 1 in a container) gives EventFileWriter the
    # same base name; opening it again would truncate the killed run's file.
    monkeypatch.setattr(event_file_writer.time, "time", lambda: 1.7e9)
    for offset, resume_step in ((0, None), (100, 6)):
        monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(0))
        _train(tmp_path, range(1, 11) if resume_step is None else range(7, 13), offset, resume_step,
               config=resume_step is None)
    assert len(_event_files(tmp_path)) == 2
    _assert_one_curve(tmp_path, new_offset=100)


def test_no_resume_step_appends_as_before(tmp_path):
    _train(tmp_path, range(1, 11), offset=0)
    (old,) = _event_files(tmp_path)
    before = old.read_bytes()
    _train(tmp_path, range(7, 13), offset=100)
    assert old.read_bytes() == before
    steps = [step for step, _ in _raw_points(tmp_path, "train/loss")]
    assert steps == sorted(list(range(1, 13)) + list(range(7, 11)))


def test_disabled_writer_with_resume_step_touches_nothing(tmp_path):
    _train(tmp_path, range(1, 11), offset=0)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    writer = events.Writer(tmp_path, enabled=False, resume_step=3)
    writer.scalars(4, {"train/loss": 1.0})
    writer.close()
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == before


def test_flops_per_token_swiglu_untied():
    model = ModelConfig(vocab_size=32, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=6, d_ff=16,
                        mlp="swiglu", tie_embeddings=False)
    # q 8*2*6=96, k and v 8*1*6=48 each, o 2*6*8=96, MLP 3*8*16=384: 672 per layer; unembedding 32*8=256
    n = 2 * 672 + 256
    attention = 6 * 2 * 2 * 6 * 10  # 6 * layers * heads * head_dim * seq_len
    assert flops.flops_per_token(model, seq_len=10) == 6 * n + attention == 11040
    # frozen weights (peft): no weight gradients, 2 FLOPs per multiply-add fewer; attention unchanged
    assert flops.flops_per_token(model, seq_len=10, frozen=True) == 4 * n + attention
    assert flops.forward_flops_per_token(model, seq_len=10) == 2 * n + attention / 3


def test_flops_per_token_gelu_tied():
    model = ModelConfig(vocab_size=50, d_model=8, n_layers=3, n_heads=2, n_kv_heads=2, d_ff=32, mlp="gelu",
                        tie_embeddings=True, position="learned", use_bias=True)
    # head_dim 8/2=4: q, k, v, o 8*2*4=64 each; MLP 2*8*32=512: 768 per layer; unembedding 50*8=400
    n = 3 * 768 + 400
    attention = 6 * 3 * 2 * 4 * 6
    assert flops.flops_per_token(model, seq_len=6) == 6 * n + attention == 17088
    untied = dataclasses.replace(model, tie_embeddings=False)
    assert flops.flops_per_token(untied, seq_len=6) == 17088  # the output matmul runs either way


def test_a_task_counts_its_own_tokens_and_flops():
    """A pair is two sequences, and a reward model reads one hidden state per sequence: no unembedding."""
    model = ModelConfig(vocab_size=50, d_model=8, n_layers=3, n_heads=2, n_kv_heads=2, d_ff=32, mlp="gelu",
                        tie_embeddings=True)
    cfg = Config(model=model, train=TrainConfig(batch_size=4))
    lm, rm = Pretrain(cfg), RewardModel(dataclasses.replace(cfg, task="reward"))
    assert lm.tokens_per_step == 4 * cfg.data.seq_len and rm.tokens_per_step == 2 * 4 * cfg.data.seq_len
    assert lm.flops_per_token == flops.flops_per_token(model, cfg.data.seq_len)
    assert lm.flops_per_token - rm.flops_per_token == 6 * 50 * 8
    lora = Pretrain(dataclasses.replace(cfg, peft=PeftConfig(method="lora")))
    assert lora.flops_per_token == flops.flops_per_token(model, cfg.data.seq_len, frozen=True)


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
    low = baselines.bits_per_byte(repetitive)
    assert set(low) == {"gzip", "bz2", "xz"}
    assert all(0 < v < 1 for v in low.values())
    high = baselines.bits_per_byte(os.urandom(1 << 14))
    assert all(v > 7 for v in high.values())
    with pytest.raises(ValueError):
        baselines.bits_per_byte(b"")


def test_format_comparison():
    table = baselines.format_comparison(1.5, {"gzip": 3.0, "bz2": 2.4, "xz": 2.25})
    lines = table.splitlines()
    assert len(lines) == 5 and len({len(line) for line in lines}) == 1
    assert "xz -9e" in table and "2.00x" in table and "1.50x" in table
