"""Data pipeline: corpus readers, packing, prepare (reuse, atomicity, shards) and per-process batches."""
import dataclasses
import gzip
import json
import os
import pickle
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest

from llm_jax.config import Config, DataConfig, ModelConfig, TrainConfig
from llm_jax.data import corpus, pipeline, prepare as prepare_module
from llm_jax.data.batches import positions_from_segments
from llm_jax.data.corpus import iter_documents
from llm_jax.data.prepare import Prepared, prepare
from llm_jax.data.shards import TokenArray
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import DataError
from llm_jax.tasks.pretrain import Pretrain

EOS = 3
T = 16  # seq_len of the pipeline tests

GUTENBERG = ("The Project Gutenberg EBook of Tests\r\nheader\r\n"
             "*** START OF THIS PROJECT GUTENBERG EBOOK TESTS ***\r\n\r\nChapter 1\r\nIt begins.\r\n\r\n"
             "*** END OF THIS PROJECT GUTENBERG EBOOK TESTS ***\r\nlicense footer\r\n")


def docs(sources, data_dir, **kw) -> list[str]:
    return list(iter_documents(tuple(sources), data_dir, **kw))


# ------------------------------------------------------------------------------------------------ corpus

def test_text_files_sorted_recursive_and_gzipped(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text("two")
    (tmp_path / "1.txt").write_text("one")
    (tmp_path / "3.txt.gz").write_bytes(gzip.compress("three\n".encode()))
    (tmp_path / "empty.txt").write_text("  \n")
    assert docs(["text:**/*.txt*"], tmp_path) == ["one", "three\n", "two"]
    assert docs([f"text:{tmp_path}/1.txt"], tmp_path / "elsewhere") == ["one"]  # absolute pattern


def test_max_bytes_cuts_deterministically(tmp_path):
    (tmp_path / "a.txt").write_text("αβγδ")  # 8 bytes
    (tmp_path / "b.txt").write_text("second")
    assert docs(["text:*.txt"], tmp_path, max_bytes=5) == ["αβ"]
    assert docs(["text:*.txt"], tmp_path, max_bytes=10) == ["αβγδ", "se"]


def test_gutenberg_markers_stripped(tmp_path):
    (tmp_path / "book.txt.gz").write_bytes(gzip.compress(GUTENBERG.encode()))
    assert docs(["gutenberg:*.gz"], tmp_path) == ["Chapter 1\nIt begins."]


def test_gutenberg_without_markers_is_an_error(tmp_path):
    (tmp_path / "book.txt").write_text("no markers here")
    with pytest.raises(DataError, match=r"book\.txt: no '\*\*\* START OF"):
        docs(["gutenberg:*.txt"], tmp_path)


def test_jsonl_field_and_errors_name_file_and_line(tmp_path):
    (tmp_path / "ok.jsonl").write_text('{"text": "a\\u2028b"}\n\n{"text": "c", "x": 1}\n')
    assert docs(["jsonl:ok.jsonl#text"], tmp_path) == ["a\u2028b", "c"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        docs(["jsonl:bad.jsonl#text"], tmp_path)
    (tmp_path / "nofield.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"nofield\.jsonl:2: no field 'text'"):
        docs(["jsonl:nofield.jsonl#text"], tmp_path)


def test_chinese_poetry_lists_objects_and_nested_content(tmp_path):
    poems = [{"title": "静夜思", "author": "李白", "paragraphs": ["床前明月光，", "疑是地上霜。"]},
             {"rhythmic": "浣溪沙", "paragraphs": ["一曲新词酒一杯。"]},
             {"notes": ["no text"]}]
    poem = {"chapter": "春晓", "paragraphs": ["春眠不觉晓"]}
    book = {"title": "千家诗", "content": [{"type": "五言", "content": [poem]}]}
    (tmp_path / "poems.json").write_text(json.dumps(poems, ensure_ascii=False))
    (tmp_path / "shijing.json.gz").write_bytes(gzip.compress(json.dumps(
        [{"title": "关雎", "chapter": "国风", "content": ["关关雎鸠"]}], ensure_ascii=False).encode()))
    (tmp_path / "single.json").write_text(json.dumps(book, ensure_ascii=False))
    assert docs(["chinese_poetry:*.json*"], tmp_path) == [
        "静夜思\n床前明月光，\n疑是地上霜。", "浣溪沙\n一曲新词酒一杯。", "关雎\n关关雎鸠", "千家诗\n五言\n春晓\n春眠不觉晓"]


def test_squad_contexts(tmp_path):
    squad = {"version": "1", "data": [{"title": "t", "paragraphs": [{"context": "第一段。", "qas": []},
                                                                   {"context": "第二段。", "qas": []}]}]}
    (tmp_path / "dev.json").write_text(json.dumps(squad, ensure_ascii=False))
    assert docs(["squad:dev.json"], tmp_path) == ["第一段。", "第二段。"]
    (tmp_path / "notsquad.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="not SQuAD JSON"):
        docs(["squad:notsquad.json"], tmp_path)


def test_invalid_utf8_is_replaced_counted_and_warned(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"ok \xff\xfe then \xe4\xb8 end \xef\xbf\xbd real")
    with pytest.warns(UserWarning, match=r"bad\.txt: 3 invalid UTF-8 sequence"):
        (text,) = docs(["text:bad.txt"], tmp_path)
    assert text == "ok \ufffd\ufffd then \ufffd end \ufffd real"


def test_bad_sources_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match=r"'nothing\*\.txt' matches no file in .*data\.data_dir=.*LLM_JAX_DATA"):
        docs(["text:nothing*.txt"], tmp_path)
    with pytest.raises(DataError, match=r"data directory .*missing.* does not exist.*LLM_JAX_DATA"):
        docs(["text:*.txt"], tmp_path / "missing")
    with pytest.raises(DataError, match="unknown kind 'txt'"):
        docs(["txt:*.txt"], tmp_path)
    with pytest.raises(DataError, match="jsonl:GLOB#FIELD"):
        docs(["jsonl:*.jsonl"], tmp_path)
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(DataError, match="hold no text"):
        docs(["text:blank.txt"], tmp_path)


def test_python_stdlib_excludes_tests():
    files = corpus._stdlib_files()
    assert any(p.name == "json" or p.parent.name == "json" for p in files)
    for p in files:
        assert not {"test", "tests", "idle_test", "site-packages"} & set(p.parts) and not p.name.startswith("test_")


# ------------------------------------------------------------------------------------------------ packing

def test_packing_segments_positions_and_weights():
    stream = np.array([10, 11, EOS, 12, 13, 14, EOS, 15, EOS, 16, 17, 18, 19])
    windows = pipeline.PackedWindows(stream, 6, np.arange(20, dtype=np.int32), EOS)
    assert len(windows) == 2
    w0, w1 = windows[0], windows[1]
    np.testing.assert_array_equal(w0.inputs, [10, 11, EOS, 12, 13, 14])
    np.testing.assert_array_equal(w0.targets, [11, EOS, 12, 13, 14, EOS])
    np.testing.assert_array_equal(w0.segment_ids, [1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(w0.positions, [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(w1.inputs, [EOS, 15, EOS, 16, 17, 18])
    np.testing.assert_array_equal(w1.segment_ids, [1, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(w1.positions, [0, 0, 1, 0, 1, 2])
    np.testing.assert_array_equal(w1.target_bytes, [15, EOS, 16, 17, 18, 19])
    assert all(w.weights.dtype == np.float32 and w.weights.sum() == 6 for w in (w0, w1))
    assert all(v.dtype in (np.int32, np.float32) and v.shape == (6,) for v in w0)


def test_positions_count_from_zero_in_every_segment_and_are_zero_on_padding():
    segments = np.array([[1, 1, 2, 2, 2, 3],    # packed documents
                         [0, 0, 1, 1, 1, 1],    # left padding (generation)
                         [1, 1, 1, 0, 0, 0]])   # right padding (eval, reward pairs)
    np.testing.assert_array_equal(positions_from_segments(segments),
                                  [[0, 1, 0, 1, 2, 0], [0, 0, 0, 1, 2, 3], [0, 1, 2, 0, 0, 0]])
    stacked = positions_from_segments(np.stack([segments, segments[::-1]]))  # any leading axes, e.g. (P, 2, T)
    np.testing.assert_array_equal(stacked[1], positions_from_segments(segments[::-1]))
    assert stacked.dtype == np.int32


def test_windows_cover_every_target_once():
    stream = np.arange(1, 103)
    windows = pipeline.PackedWindows(stream, 10, np.ones(200, np.int32), EOS)
    targets = np.concatenate([windows[i].targets for i in range(len(windows))])
    np.testing.assert_array_equal(targets, stream[1:len(windows) * 10 + 1])
    assert len(stream) - 1 - len(targets) < 10  # only the tail shorter than a window is dropped


# ------------------------------------------------------------------------------------------------ prepare

def _write_corpus(data_dir, n_docs=60):
    rng = np.random.default_rng(0)
    words = "the a fox dog runs jumps over under quick lazy brown red 春 眠 晓 def return (x) = + 1 2".split()
    for i in range(n_docs):
        lines = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(rng.integers(2, 8))]
        (data_dir / f"doc{i:03d}.txt").write_text("\n".join(lines))


def _config(data_dir, **data) -> Config:
    return Config(model=ModelConfig(vocab_size=320),
                  data=DataConfig(sources=("text:*.txt",), data_dir=str(data_dir), eval_fraction=0.2, **data))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Prepared:
    data_dir = tmp_path_factory.mktemp("corpus")
    _write_corpus(data_dir)
    out = tmp_path_factory.mktemp("prep") / "data"
    prepare(_config(data_dir), out)
    return Prepared.load(out)


def test_prepare_writes_shards_and_meta(prepared):
    meta = prepared.meta
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == prepared.tokenizer.vocab_size <= 320
    assert sorted(p.name for p in prepared.path.iterdir()) == [
        "eval-00000.bin", "meta.json", "tokenizer.model", "train-00000.bin"]
    train, eval_ = prepared.tokens("train"), prepared.tokens("eval")
    assert (len(train), len(eval_)) == (meta["splits"]["train"]["tokens"], meta["splits"]["eval"]["tokens"])
    splits = meta["splits"]
    assert abs(splits["eval"]["text_bytes"] / meta["text_bytes"] - 0.2) < 0.05
    assert splits["train"]["text_bytes"] + splits["eval"]["text_bytes"] == meta["text_bytes"]
    for split, tokens in (("train", train), ("eval", eval_)):
        assert (tokens[:] == EOS).sum() == splits[split]["documents"] and tokens[-1] == EOS
    assert splits["train"]["documents"] + splits["eval"]["documents"] == meta["documents"] == 60
    texts = docs(["text:*.txt"], Path(meta["config"]["data_dir"]))
    held = prepare_module.held_out_documents(np.array([len(t.encode()) for t in texts]), 0.2)
    first_train = next(t for t, h in zip(texts, held) if not h)
    assert prepared.tokenizer.decode(train[:np.argmax(train[:] == EOS)]) == first_train
    assert meta["tokenizer_sha256"] == prepared.tokenizer.sha256 == Tokenizer.load(prepared.tokenizer_path).sha256


def test_prepare_is_reused_and_refuses_another_config(prepared, capsys):
    cfg = _config(prepared.meta["config"]["data_dir"])
    prepare(cfg, prepared.path)
    assert "reusing" in capsys.readouterr().out
    again = Prepared.load(prepared.path)
    np.testing.assert_array_equal(again.tokens("eval")[:], prepared.tokens("eval")[:])
    with pytest.raises(DataError, match=r"different config \(eval_fraction differ\)"):
        prepare(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, eval_fraction=0.3)), prepared.path)


def test_prepare_is_atomic(tmp_path, monkeypatch):
    _write_corpus(tmp_path, n_docs=5)

    def crash(*args):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(prepare_module, "_write_shards", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(_config(tmp_path), tmp_path / "out" / "data")
    assert list((tmp_path / "out").iterdir()) == []


def test_publish_removes_what_a_killed_publish_left_and_nothing_else(prepared, tmp_path):
    """A publish killed half-way leaves its temporary directory beside the target; the next publish there
    removes it, but not those of live processes (another job preparing the same shared data) or other hosts."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    mine = f".data.tmp-{socket.gethostname()}."
    stale, live, elsewhere = f"{mine}{gone.pid}.a", f"{mine}{os.getppid()}.b", f".data.tmp-elsewhere.{gone.pid}.c"
    for name in (stale, live, elsewhere):
        (tmp_path / name).mkdir()
    prepare(_config(prepared.meta["config"]["data_dir"], tokenizer=str(prepared.tokenizer_path)), tmp_path / "data")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live, elsewhere, "data"])


def test_given_tokenizer_larger_than_model_vocab_is_an_error(prepared, tmp_path):
    cfg = _config(tmp_path, tokenizer=str(prepared.path / "tokenizer.model"))
    cfg = dataclasses.replace(cfg, model=ModelConfig(vocab_size=260))
    with pytest.raises(DataError, match="more than model.vocab_size=260"):
        prepare(cfg, tmp_path / "out")


def test_token_array_spans_shards(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare_module, "SHARD_TOKENS", 100)
    cfg = _config(prepared.meta["config"]["data_dir"], tokenizer=str(prepared.path / "tokenizer.model"))
    prepare(cfg, tmp_path / "sharded")
    sharded = Prepared.load(tmp_path / "sharded")
    assert len(sharded.meta["splits"]["train"]["shards"]) > 3
    train, whole = sharded.tokens("train"), prepared.tokens("train")[:]
    np.testing.assert_array_equal(train[:], whole)
    np.testing.assert_array_equal(train[95:305], whole[95:305])
    assert train[-1] == whole[-1] and train[150] == whole[150]
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(train))[190:210], whole[190:210])
    assert isinstance(train, TokenArray) and not train[:50].flags.writeable


# ------------------------------------------------------------------------------------------------ batches

def train_source(prepared, batch_size, microbatches, seed, process_index=0, process_count=1, num_workers=0):
    """The pretraining task's batch source over `prepared` (the loop's way in)."""
    cfg = Config(data=DataConfig(seq_len=T, num_workers=num_workers),
                 train=TrainConfig(batch_size=batch_size, microbatches=microbatches, seed=seed))
    return Pretrain(cfg).train_source(prepared, process_index, process_count)


def eval_batches(prepared, seq_len, batch_size, process_index, process_count, max_batches=0):
    cfg = Config(data=DataConfig(seq_len=seq_len), train=TrainConfig(batch_size=batch_size))
    return Pretrain(cfg).eval_batches(prepared, process_index, process_count, max_batches)


def _rows(batch) -> np.ndarray:
    return batch.inputs.reshape(-1, T)


def test_train_batches_shard_across_processes(prepared):
    single = train_source(prepared, 8, 2, seed=1, process_index=0, process_count=1)
    shards = [train_source(prepared, 8, 2, seed=1, process_index=p, process_count=2)
              for p in range(2)]
    for _ in range(3):
        global_rows = _rows(single.next_batch())
        local = [it.next_batch() for it in shards]
        assert all(v.shape == (2, 2, T) for b in local for v in b)
        for p in range(2):
            np.testing.assert_array_equal(_rows(local[p]), global_rows[p::2])


def test_train_batches_deterministic_resumable_and_reshuffled_each_epoch(prepared):
    n = len(pipeline.PackedWindows(prepared.tokens("train"), T, prepared.tokenizer.byte_lengths(), EOS))
    it = train_source(prepared, 1, 1, seed=3, process_index=0, process_count=1)
    rows = [_rows(it.next_batch())[0] for _ in range(2 * n)]
    epoch0, epoch1 = np.stack(rows[:n]), np.stack(rows[n:])
    assert sorted(map(bytes, epoch0)) == sorted(map(bytes, epoch1))  # each epoch holds every window once
    assert not np.array_equal(epoch0, epoch1)
    again = train_source(prepared, 1, 1, seed=3, process_index=0, process_count=1)
    np.testing.assert_array_equal(_rows(again.next_batch())[0], rows[0])
    other = train_source(prepared, 1, 1, seed=4, process_index=0, process_count=1)
    assert not np.array_equal(np.stack([_rows(other.next_batch())[0] for _ in range(8)]), epoch0[:8])
    state = again.get_state()
    resumed = train_source(prepared, 1, 1, seed=3, process_index=0, process_count=1)
    resumed.set_state(state)
    np.testing.assert_array_equal(_rows(resumed.next_batch())[0], rows[1])


def test_worker_processes_give_the_same_batches(prepared):
    plain = train_source(prepared, 4, 1, seed=0, process_index=0, process_count=1)
    workers = train_source(prepared, 4, 1, seed=0, process_index=0, process_count=1, num_workers=2)
    try:
        for _ in range(4):
            expected, got = plain.next_batch(), workers.next_batch()
            assert all(np.array_equal(np.asarray(g), e) for g, e in zip(got, expected))
            del got
    finally:
        workers.close()


def test_batch_size_errors_name_the_key(prepared):
    with pytest.raises(DataError, match=r"train.batch_size=6 is not divisible by the 4 processes"):
        train_source(prepared, 6, 1, 0, 0, 4)
    with pytest.raises(DataError, match=r"train.batch_size=8 .* train.microbatches=3"):
        train_source(prepared, 8, 3, 0, 0, 1)


def test_eval_batches_in_order_padded_and_split_across_processes(prepared):
    windows = pipeline.PackedWindows(prepared.tokens("eval"), T, prepared.tokenizer.byte_lengths(), EOS)
    whole = eval_batches(prepared, T, 6, 0, 1)
    assert len(whole) == -(-len(windows) // 6) and len(windows) % 6  # the last batch is padded
    rows = np.concatenate([b.inputs for b in whole])
    np.testing.assert_array_equal(rows[:len(windows)], [windows[i].inputs for i in range(len(windows))])
    last = whole[-1]
    pad = last.weights.sum(axis=1) == 0
    assert pad.sum() == len(whole) * 6 - len(windows)
    assert (last.segment_ids[pad] == 0).all() and (last.target_bytes[pad] == 0).all()
    assert (last.inputs[pad] == prepared.tokenizer.pad_id).all()
    halves = [eval_batches(prepared, T, 6, p, 2, max_batches=2) for p in range(2)]
    assert len(halves[0]) == 2 and halves[0][0].inputs.shape == (3, T)
    for p in range(2):
        np.testing.assert_array_equal(halves[p][1].targets, whole[1].targets[p::2])


def test_eval_text_matches_target_bytes(prepared):
    batches = eval_batches(prepared, T, 4, 0, 1)
    for n_batches in (1, 3):
        text = pipeline.eval_text(prepared, T, 4 * n_batches)
        assert len(text) == sum(int(b.target_bytes.sum()) for b in batches[:n_batches])
    everything = pipeline.eval_text(prepared, T, 10**9)
    assert len(everything) == sum(int(b.target_bytes.sum()) for b in batches)
    assert everything.decode("utf-8", errors="replace").strip()


def test_eval_split_too_small_is_an_error(prepared):
    with pytest.raises(DataError, match=r"eval split .* fewer than one window of data.seq_len\+1=100001"):
        eval_batches(prepared, 100_000, 4, 0, 1)
