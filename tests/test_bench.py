"""`llm-jax bench`: the printed figures are parsed and must be consistent with each other."""
import re

import pytest

from llm_jax.cli.main import main, parser

TINY = ["--config", "pretrain_tiny", "--set", "model.vocab_size=320", "--set", "model.d_model=32",
        "--set", "model.n_layers=2", "--set", "model.d_ff=64", "--set", "data.seq_len=32",
        "--set", "train.batch_size=8", "--set", "data.max_bytes=0", "--set", "model.mlp=swiglu",
        "--set", "optim.optimizer=adamw"]


def table(text):
    rows = dict(re.findall(r"^(\S[^\n]*?)\s{2,}(\S[^\n]*)$", text, re.M))
    number = lambda key: float(re.match(r"[\d,.]+", rows[key]).group().replace(",", ""))
    return rows, number


@pytest.mark.slow
def test_bench_train_figures_agree_with_each_other(capsys):
    assert main(["bench", "train", *TINY, "--steps", "4", "--warmup", "1", "--set", "train.peak_tflops=0.005"]) == 0
    rows, number = table(capsys.readouterr().out)
    assert number("parameters") > 0 and number("tokens / step") == 8 * 32
    tokens_per_sec = number("tokens / s")
    assert tokens_per_sec > 0
    assert abs(tokens_per_sec - 8 * 32 / (number("step time (median)") / 1e3)) / tokens_per_sec < 0.01
    # MFU = achieved model FLOP/s over the peak of all devices (5 GFLOP/s each, given)
    mfu, n_devices = float(rows["MFU"].rstrip("%")) / 100, number("devices")
    assert mfu > 0 and abs(mfu - number("model TFLOP/s") / (0.005 * n_devices)) / mfu < 0.01
    assert rows["data"] == "synthetic" and number("compile time") > 0
    mib = [float(x) * {"MiB": 1, "GiB": 1024}[unit]
           for x, unit in re.findall(r"([\d.]+) (MiB|GiB)", rows["step memory (XLA plan)"])]
    total, inputs, outputs, scratch = mib
    assert inputs > 0 and scratch > 0 and abs(total - (inputs + outputs + scratch)) < 0.2


@pytest.mark.slow
def test_bench_train_runs_any_task(capsys):
    """A reward model on synthetic pairs: no data, no tokenizer, and tokens count both answers of a pair."""
    assert main(["bench", "train", "--config", "rm_tiny", "--set", "model.n_layers=1", "--set", "data.seq_len=16",
                 "--set", "train.batch_size=8", "--steps", "2", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("bench train rm_tiny\n")
    rows, number = table(out)
    assert rows["data"] == "synthetic" and number("tokens / step") == 8 * 2 * 16 and number("tokens / s") > 0


@pytest.mark.slow
def test_bench_data_generate_and_checkpoint_report_positive_rates(corpus, capsys):
    data = ["--set", f"data.sources=text:{corpus}/*.txt"]
    assert main(["bench", "data", *TINY, *data, "--steps", "5"]) == 0
    assert float(re.search(r": ([\d,]+) tokens/s", capsys.readouterr().out).group(1).replace(",", "")) > 0
    assert main(["bench", "generate", *TINY]) == 0
    rates = re.findall(r"batch\s+(\d+): ([\d,]+) tokens/s", capsys.readouterr().out)
    assert [b for b, _ in rates] == ["1", "16"] and all(float(r.replace(",", "")) > 0 for _, r in rates)
    assert main(["bench", "checkpoint", *TINY]) == 0
    held, whole = map(float, re.search(r"up (\d+) ms .* takes (\d+) ms", capsys.readouterr().out).groups())
    assert 0 <= held <= whole


@pytest.mark.slow
def test_bench_train_with_real_data_and_a_profile(tmp_path, corpus, capsys):
    assert main(["bench", "train", *TINY, "--set", f"data.sources=text:{corpus}/*.txt", "--real-data",
                 "--steps", "3", "--warmup", "1", "--profile", str(tmp_path / "prof")]) == 0
    rows, number = table(capsys.readouterr().out)
    assert rows["data"] == "pipeline (--real-data)" and number("tokens / s") > 0
    assert list((tmp_path / "prof").rglob("*.xplane.pb")), "no profiler trace written"


@pytest.mark.slow
def test_bench_memory_finds_the_largest_batch_whose_plan_fits(capsys):
    from llm_jax.bench.memory import bench_memory
    from llm_jax.cli.args import resolve
    cfg = resolve(parser().parse_args(["bench", "memory", *TINY]))
    one = bench_memory(cfg, limit_gib=1e-9, max_compiles=1)  # batch 8 only (it cannot fit in 1 byte)
    assert one["largest"] is None and list(one["plans"]) == [8]
    limit_gib = 2.5 * one["plans"][8] / 2**30
    assert main(["bench", "memory", *TINY, "--limit-gib", str(limit_gib)]) == 0
    out = capsys.readouterr().out
    rows = [(int(b), float(x) * {"MiB": 2**20, "GiB": 2**30}[u], bool(no))
            for b, x, u, no in re.findall(r"^\s+(\d+)\s+([\d.]+) (MiB|GiB)(  \(does not fit\))?$", out, re.M)]
    assert [b for b, _, _ in rows] == sorted(b for b, _, _ in rows) and len(rows) >= 3
    assert all(a[1] < b[1] for a, b in zip(rows, rows[1:])), "memory must grow with the batch"
    assert all(no == (size > limit_gib * 2**30) for _, size, no in rows)
    largest = int(re.search(r"largest batch that fits: (\d+)", out).group(1))
    # 8 fake devices shard the batch: the answer is a multiple of 8, and 8 more rows no longer fit.
    assert largest % 8 == 0 and largest >= 16 and (largest + 8, True) in [(b, no) for b, _, no in rows]


@pytest.mark.slow
def test_bench_train_compare_torch_alternates_blocks_and_ends_with_the_ratio(capsys):
    pytest.importorskip("torch")
    assert main(["bench", "train", *TINY, "--steps", "2", "--warmup", "0", "--compare-torch"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^host: .+; \d+ of \d+ cores usable; ISA ", out, re.M)
    assert re.search(r"^PyTorch runtime: torch \S+; \d+ intra-op threads", out, re.M)
    block = r"block \d: llm_jax ([\d.]+) ms/step \(.*PyTorch ([\d.]+) ms/step"
    blocks = [tuple(map(float, b)) for b in re.findall(block, out)]
    assert len(blocks) == 3 and all(j > 0 and t > 0 for j, t in blocks)
    medians = {side: float(re.search(rf"^{side}:\s+median ([\d.]+) ms/step", out, re.M).group(1))
               for side in ("llm_jax", "PyTorch")}
    ratio = float(re.search(r"ratio: ([\d.]+) \(medians of 3 blocks\)", out.strip().splitlines()[-1]).group(1))
    assert ratio == pytest.approx(medians["PyTorch"] / medians["llm_jax"], rel=0.02, abs=0.01)
