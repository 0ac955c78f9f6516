"""An evaluation that does not flatter the model: held-out whole documents spread over the corpus, compressors
primed with the training text (cached beside the data), and the report's reference lines and wall-clock plot."""
import gzip
import json
import lzma

import numpy as np
import pytest

from llm_jax.config import Config, DataConfig, ModelConfig, TrainConfig, to_json
from llm_jax.data import pipeline, prepare as prepare_module
from llm_jax.data.prepare import Prepared, held_out_documents, prepare
from llm_jax.evaluation import baselines
from llm_jax.errors import DataError
from llm_jax.evaluation.baselines import Primer, compressed_size
from llm_jax.evaluation.text import format_report, primer_of, report
from llm_jax.sweep.report import write_report
from llm_jax.tasks.base import Evaluation
from llm_jax.tasks.pretrain import Pretrain
from llm_jax.train.events import Writer

WORDS = "the a fox dog runs jumps over under quick lazy brown red def return".split()
RARE = "qzxjvkw"  # only in held-out documents


def _text(rng, n_lines: int) -> str:
    return "".join(" ".join(rng.choice(WORDS, size=8)) + "\n" for _ in range(n_lines))


def _config(data_dir, fraction=0.2, **train) -> Config:
    return Config(model=ModelConfig(vocab_size=320),
                  data=DataConfig(sources=("text:*.txt",), data_dir=str(data_dir), eval_fraction=fraction,
                                  seq_len=16),
                  train=TrainConfig(batch_size=4, **train))


def _split_documents(prepared: Prepared, split: str) -> list[str]:
    tokens = prepared.tokens(split)[:]
    ends = np.flatnonzero(tokens == prepared.tokenizer.eos_id)
    return [prepared.tokenizer.decode(d) for d in np.split(tokens, ends + 1)[:-1]]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """20 documents of one size; the held-out ones (known from the sizes alone) hold RARE in place of a word."""
    data_dir, rng = tmp_path_factory.mktemp("corpus"), np.random.default_rng(0)
    texts = [f"document {i:02d} lazy\n" + _text(rng, 30) for i in range(20)]
    held = held_out_documents(np.array([len(t.encode()) for t in texts]), 0.2)
    texts = [t.replace("lazy", RARE, 1) if h else t for t, h in zip(texts, held)]
    for i, text in enumerate(texts):
        (data_dir / f"doc{i:02d}.txt").write_text(text)
    return data_dir, texts, held


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    data_dir, *_ = corpus
    out = tmp_path_factory.mktemp("prep") / "data"
    prepare(_config(data_dir), out)
    return Prepared.load(out)


def test_held_out_documents_are_whole_spread_and_fixed(corpus, prepared, tmp_path):
    _, texts, held = corpus
    assert held.sum() == 4 and not held[-4:].all() and np.diff(np.flatnonzero(held)).min() > 1
    assert _split_documents(prepared, "eval") == [t for t, h in zip(texts, held) if h]  # in corpus order
    assert _split_documents(prepared, "train") == [t for t, h in zip(texts, held) if not h]
    splits = prepared.meta["splits"]
    assert (splits["eval"]["documents"], splits["train"]["documents"]) == (4, 16)
    assert splits["eval"]["text_bytes"] == sum(len(t.encode()) for t, h in zip(texts, held) if h)
    again = tmp_path / "again"
    prepare(_config(corpus[0]), again)
    np.testing.assert_array_equal(Prepared.load(again).tokens("eval")[:], prepared.tokens("eval")[:])
    sizes = np.arange(1, 500)
    np.testing.assert_array_equal(held_out_documents(sizes, 0.1), held_out_documents(sizes, 0.1))


def test_held_out_bytes_follow_the_fraction_all_along():
    sizes = np.random.default_rng(1).integers(10, 5000, 3000)
    held = held_out_documents(sizes, 0.1)
    for end in (300, 1500, 3000):
        assert sizes[:end][held[:end]].sum() / sizes[:end].sum() == pytest.approx(0.1, abs=0.02)
    assert held_out_documents(np.array([5, 5]), 0.1).sum() == 1  # at least one held out, one kept
    assert not held_out_documents(np.array([100]), 0.1).any()  # one document: cut by prepare instead


def _spy_on_tokenizer_sample(monkeypatch) -> list[str]:
    """The texts prepare trains its tokenizer on, once it has."""
    seen, train = [], prepare_module.train_tokenizer

    def spy(sample, *args, **kwargs):
        seen.extend(sample)
        return train(seen, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "train_tokenizer", spy)
    return seen


def test_tokenizer_never_sees_held_out_text(corpus, tmp_path, monkeypatch):
    data_dir, texts, held = corpus
    seen = _spy_on_tokenizer_sample(monkeypatch)
    prepare(_config(data_dir), tmp_path / "data")
    sample = "".join(seen)
    assert "document 00" in sample and RARE not in sample
    tok = Prepared.load(tmp_path / "data").tokenizer
    assert not any(RARE[:4].encode() in tok.decode_bytes([i]) for i in range(tok.vocab_size))


def test_one_document_holds_out_its_tail_and_trains_the_tokenizer_on_its_head(tmp_path, monkeypatch):
    text = _text(np.random.default_rng(2), 400) + "the very last line\n"
    (tmp_path / "input.txt").write_text(text)
    seen = _spy_on_tokenizer_sample(monkeypatch)
    prepare(_config(tmp_path, fraction=0.1), tmp_path / "data")
    prepared = Prepared.load(tmp_path / "data")
    tok = prepared.tokenizer
    train_bytes, eval_bytes = (tok.decode_bytes(prepared.tokens(s)[:]) for s in ("train", "eval"))
    assert train_bytes + eval_bytes == text.encode() and prepared.tokens("eval")[-1] == tok.eos_id
    assert len(eval_bytes) / len(text.encode()) == pytest.approx(0.1, abs=0.01)
    assert prepared.meta["splits"]["eval"]["text_bytes"] == len(eval_bytes)
    assert len("".join(seen).encode()) <= len(train_bytes) and "very last" not in "".join(seen)


def test_primed_compressors():
    rng = np.random.default_rng(3)
    primer = _text(rng, 2000).encode()
    repeat = primer[-30_000:-10_000]  # within gzip's window too
    plain, primed = baselines.bits_per_byte(repeat), Primer(primer).primed_bits_per_byte(repeat)
    assert primed["xz_primed"] < 0.1 * plain["xz"] and primed["gzip_primed"] < 0.1 * plain["gzip"]
    assert primed["bz2_primed"] < 0.8 * plain["bz2"]  # its sorted contexts gain less from a repeat
    fresh = _text(rng, 40).encode()
    unprimed = {k + "_primed": v for k, v in baselines.bits_per_byte(fresh).items()}
    assert Primer(b"").primed_bits_per_byte(fresh) == unprimed
    small = primer[:5000]  # within every window: primed with all of it
    for name, bpb in Primer(small).primed_bits_per_byte(fresh).items():
        name = name.removesuffix("_primed")
        assert bpb == 8 * (compressed_size(name, small + fresh) - compressed_size(name, small)) / len(fresh)
    big = Primer(b"x" * (2 * baselines.BZ2_BLOCK))
    assert len(big.tail("gzip", 10)) == baselines.GZIP_WINDOW and len(big.tail("bz2", 10)) == baselines.BZ2_BLOCK - 10
    assert baselines.label("xz_primed") == "xz -9e primed"


def _count_xz(monkeypatch) -> list:
    calls, compress = [], lzma.compress
    monkeypatch.setattr(lzma, "compress", lambda *a, **k: calls.append(1) or compress(*a, **k))
    return calls


def test_cache_is_read_back_and_a_read_only_directory_goes_without(tmp_path, monkeypatch):
    data, primer = _text(np.random.default_rng(4), 30).encode(), _text(np.random.default_rng(5), 300).encode()
    calls = _count_xz(monkeypatch)
    first = baselines.cached(data, primer, tmp_path)
    assert len(calls) == 3 and set(first) == {"gzip", "bz2", "xz", "gzip_primed", "bz2_primed", "xz_primed"}
    assert baselines.cached(data, primer, tmp_path) == first and len(calls) == 3
    assert [p.name.startswith("baselines-") for p in tmp_path.iterdir()] == [True]
    assert baselines.cached(data, primer[1:], tmp_path) == pytest.approx(first, rel=0.05) and len(calls) == 6

    def read_only(*args, **kwargs):
        raise PermissionError(30, "Read-only file system")

    monkeypatch.setattr(baselines, "write_atomic", read_only)
    readonly = tmp_path / "ro"
    readonly.mkdir()
    assert baselines.cached(data, primer, readonly) == first and list(readonly.iterdir()) == []


def test_reference_lines_and_finish_share_one_compression(prepared, tmp_path, monkeypatch):
    meta = json.loads((prepared.path / "meta.json").read_text())
    task = Pretrain(_config(prepared.meta["config"]["data_dir"], eval_batches=2))
    lines = task.reference_lines(prepared)
    assert set(lines) == {"gzip", "bz2", "xz", "gzip_primed", "bz2_primed", "xz_primed"}
    assert all(set(v) == {"eval/bits_per_byte"} for v in lines.values())
    calls = _count_xz(monkeypatch)
    held_out = pipeline.eval_text(prepared, 16, 8)
    evaluation = Evaluation(10, {"bytes": len(held_out), "tokens": 100.0}, 2, {"eval/bits_per_byte": 2.0})
    summary = task.finish(prepared, evaluation)
    assert calls == [] and summary.results["baselines_bits_per_byte"]["xz_primed"] == lines["xz_primed"][
        "eval/bits_per_byte"]
    assert summary.scalars["compare/xz_primed_bits_per_byte"] > 0 and "xz -9e primed" in summary.text
    assert json.loads((prepared.path / "meta.json").read_text()) == meta  # the data stay as prepared
    whole = Pretrain(_config(prepared.meta["config"]["data_dir"], eval_batches=0)).reference_lines(prepared)
    assert whole["xz"] != lines["xz"]  # eval_batches=0: the whole split, more than 2 batches


def test_report_draws_reference_lines_and_eval_against_wall_clock(tmp_path):
    sweep = tmp_path / "sweep"
    runs = {"lr=1": 1.0, "lr=2": 0.5}
    for name, speed in runs.items():
        run = sweep / name
        (run / "tb").mkdir(parents=True)
        (run / "config.json").write_text(to_json(Config(train=TrainConfig(steps=30))))
        writers = {"": Writer(run / "tb", True), "xz": Writer(run / "tb" / "xz", True),
                   "xz_primed": Writer(run / "tb" / "xz_primed", True)}
        for step in range(0, 31, 10):
            writers[""].scalars(step, {"train/loss_bits_per_token": 5 - step / 10, "perf/tokens_per_sec": 1e4,
                                       "eval/bits_per_byte": 3 - step / 15, "time/train_s": step * speed})
            writers["xz"].scalars(step, {"eval/bits_per_byte": 2.0})
            writers["xz_primed"].scalars(step, {"eval/bits_per_byte": 1.5})
        for w in writers.values():
            w.close()
        (run / "results.json").write_text(json.dumps({"steps": 30, "params": 1000, "train_time_s": 30 * speed}))
    (sweep / "sweep.json").write_text(json.dumps({
        "name": "t", "base": "pretrain_tiny", "overrides": [], "extra_overrides": [], "swept": ["optim.lr"],
        "runs": [{"name": name, "hparams": {"optim.lr": float(name[-1])}} for name in runs]}))
    report = write_report(sweep).read_text()
    for png in ("eval_curves.png", "eval_vs_wall_clock.png"):
        assert (sweep / png).stat().st_size > 1000 and f"]({png})" in report
    header = next(line for line in report.splitlines() if line.startswith("| run"))
    assert header.rstrip(" |").endswith("train s") and "| 15 |" in report


def test_report_leaves_out_the_wall_clock_plot_without_training_time(tmp_path):
    run = tmp_path / "sweep" / "a"
    (run / "tb").mkdir(parents=True)
    (run / "config.json").write_text(to_json(Config()))
    writer = Writer(run / "tb", True)
    writer.scalars(5, {"eval/bits_per_byte": 2.5, "train/loss_bits_per_token": 4.0})
    writer.close()
    (tmp_path / "sweep" / "sweep.json").write_text(json.dumps({
        "name": "t", "base": "b", "overrides": [], "extra_overrides": [], "swept": [],
        "runs": [{"name": "a", "hparams": {}}]}))
    report = write_report(tmp_path / "sweep").read_text()
    assert "eval_curves.png" in report and "wall_clock" not in report and "| train s |" not in report
    assert not (tmp_path / "sweep" / "eval_vs_wall_clock.png").exists()


def test_eval_primes_with_given_files_or_the_runs_training_text(prepared, tmp_path):
    (tmp_path / "a.txt").write_text("first ")
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress("second".encode()))
    files = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt.gz")]
    assert primer_of(files, tmp_path, Config())[0] == b"first second"
    assert primer_of([], tmp_path, Config()) == (b"", "") == primer_of(None, tmp_path / "export", Config())
    with pytest.raises(DataError, match="--prime .*missing.txt: no such file"):
        primer_of([str(tmp_path / "missing.txt")], tmp_path, Config())
    run_cfg = _config(prepared.meta["config"]["data_dir"])
    primer, source = primer_of(None, prepared.path.parent, run_cfg)  # the run's own RUN_DIR/data
    assert primer == prepared.tokenizer.decode_bytes(prepared.tokens("train")[:]) and str(prepared.path) in source
    texts = ["the quick brown fox\n", "runs over the lazy dog\n"]
    totals = {"nats": 50.0, "tokens": 12.0, "bytes": float(sum(len(t.encode()) for t in texts))}
    r = report(totals, [t.encode() for t in texts], primer, source)
    assert r["primer"]["bytes"] == len(primer) and set(r["baselines_bits_per_byte"]) >= {"xz", "xz_primed"}
    assert "xz -9e primed" in format_report(r, as_json=False)
