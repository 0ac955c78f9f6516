"""SFT batches: weights exactly on assistant targets at every boundary, packing, splits, sharding, the loss."""
import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from llm_jax.config import Config, DataConfig, TrainConfig
from llm_jax.data.batches import TokenBatch, stack
from llm_jax.data.chat.dialogue import Message
from llm_jax.data.chat.sft import PreparedSFT, pack, prepare_sft, row_arrays, row_batch
from llm_jax.data.chat.template import render
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.errors import DataError
from llm_jax.tasks.losses import token_nats, weighted_sums
from llm_jax.tasks.sft import SFT

U, A, S = "user", "assistant", "system"
CORPUS = ["What is the capital of France? The capital of France is Paris. Hello, how are you?\n" * 8,
          "床前明月光，疑是地上霜。举头望明月，低头思故乡。你好，请问今天天气怎么样？\n" * 8]
SEQ_LEN = 80  # rendered dialogues take 27 to 91 tokens: several share a row, a few are cut


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "tok", vocab_size=320)


def dialogue(k):
    """A varied dialogue: some multi-turn, some with a system prompt, some long enough to be truncated."""
    turns = [Message(S, "Be brief.")] if k % 3 == 0 else []
    for t in range(1 + k % 2):
        turns += [Message(U, f"What is {k} plus {t}?"), Message(A, f"It is {k + t}. Paris." * (1 + (k % 5 == 4)))]
    return turns


def config(tmp_path, n_dialogues=60, eval_fraction=0.2, seq_len=SEQ_LEN, extra=()):
    lines = [json.dumps({"messages": [m._asdict() for m in dialogue(k)]}) for k in range(n_dialogues)]
    (tmp_path / "chats.jsonl").write_text("\n".join([*lines, *extra]) + "\n")
    data = DataConfig(sources=("chat:chats.jsonl",), data_dir=str(tmp_path), seq_len=seq_len,
                      eval_fraction=eval_fraction)
    return dataclasses.replace(Config(), data=data)


def prepared_sft(cfg, out, tok) -> PreparedSFT:
    prepare_sft(cfg, out, tok)
    return PreparedSFT.load(out)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok):
    tmp = tmp_path_factory.mktemp("sft")
    return prepared_sft(config(tmp), tmp / "prepared", tok)


def test_hand_checked_row():
    # A = [10 11 12 13] (mask 0 0 1 1) and B = [20 .. 24] (mask 0 0 0 1 1) fill a row of 10 with one pad.
    a = (np.array([10, 11, 12, 13]), np.array([0, 0, 1, 1], bool))
    b = (np.array([20, 21, 22, 23, 24]), np.array([0, 0, 0, 1, 1], bool))
    assert pack([4, 5], 10) == [[0, 1]]
    row = row_arrays([a, b], 10, pad_id=0, dtype=np.uint16)
    batch = row_batch(row["tokens"], row["segments"], row["mask"], np.arange(100, dtype=np.int32))
    np.testing.assert_array_equal(batch.inputs, [10, 11, 12, 13, 20, 21, 22, 23, 24])
    np.testing.assert_array_equal(batch.targets, [11, 12, 13, 20, 21, 22, 23, 24, 0])
    np.testing.assert_array_equal(batch.segment_ids, [1, 1, 1, 1, 2, 2, 2, 2, 2])
    np.testing.assert_array_equal(batch.positions, [0, 1, 2, 3, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(batch.weights, [0, 1, 1, 0, 0, 0, 1, 1, 0])
    np.testing.assert_array_equal(batch.target_bytes, [11, 12, 13, 20, 21, 22, 23, 24, 0])
    assert {k: v.dtype for k, v in batch._asdict().items()} == {
        k: np.float32 if k == "weights" else np.int32 for k in TokenBatch._fields}


def test_next_example_first_token_is_never_a_target():
    # Even a (hypothetical) mask True on B's first token gives no weight where A's last token predicts it.
    a, b = (np.array([5, 6]), np.array([0, 1], bool)), (np.array([7, 8, 9]), np.array([1, 1, 1], bool))
    row = row_arrays([a, b], 7, pad_id=0, dtype=np.uint16)
    batch = row_batch(row["tokens"], row["segments"], row["mask"], np.ones(10, np.int32))
    np.testing.assert_array_equal(batch.weights, [1, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(batch.positions, [0, 1, 0, 1, 2, 0])


def test_best_fit_packing_is_whole_and_tight():
    rows = pack([6, 5, 4, 3, 2, 1, 9], 10)
    assert rows == [[0, 2], [1, 3, 4], [5, 6]]
    lengths = np.random.default_rng(0).integers(1, 11, 500)
    rows = pack(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[r]) <= 10 for r in rows)
    with pytest.raises(ValueError, match="11 tokens"):
        pack([11], 10)


def _segments(batch):
    """(row, start, end) of every example in a (B, T) batch."""
    for r, seg in enumerate(batch.segment_ids):
        for s in set(seg.tolist()) - {0}:
            where = np.flatnonzero(seg == s)
            yield r, where[0], where[-1] + 1


def all_rows(prepared, split):
    rows = prepared.rows(split, SEQ_LEN)
    return stack([rows[i] for i in range(len(rows))])


def task(batch_size, microbatches=1, seed=0):
    """The SFT task with this batch shape: its batch source and eval batches are the loop's way in."""
    return SFT(Config(task="sft", data=DataConfig(seq_len=SEQ_LEN),
                      train=TrainConfig(batch_size=batch_size, microbatches=microbatches, seed=seed)))


def test_weights_are_exactly_the_assistant_targets(prepared, tok):
    rendered = {}  # rendered ids -> loss_mask, for every dialogue
    for k in range(60):
        ids, mask = render(dialogue(k), tok, max_len=SEQ_LEN + 1)
        rendered[tuple(ids.tolist())] = mask
    end, assistant = tok.specials["<|end|>"], tok.specials["<|assistant|>"]
    n_examples, n_full = 0, 0
    for batch in (all_rows(prepared, "train"), all_rows(prepared, "eval")):
        for r, start, stop in _segments(batch):
            inputs = batch.inputs[r, start:stop].tolist()
            full = tuple(inputs + [int(batch.targets[r, stop - 1])])
            if stop == SEQ_LEN and full in rendered:  # the example fills the row: its last token is a target
                expected, n_full = rendered[full][1:], n_full + 1
            else:  # the last input's target is the next example's first token or padding: never weighted
                expected = np.append(rendered[tuple(inputs)][1:], False)
            np.testing.assert_array_equal(batch.weights[r, start:stop], expected)
            np.testing.assert_array_equal(batch.positions[r, start:stop], np.arange(stop - start))
            n_examples += 1
        padding = batch.segment_ids == 0
        assert not batch.weights[padding].any() and not batch.positions[padding].any()
        assert (batch.inputs[padding] == tok.pad_id).all()
        # weighted targets: assistant content and <|end|>, never a role tag; the first content token after
        # every <|assistant|> is weighted
        weighted = batch.targets[batch.weights == 1]
        assert assistant not in weighted and end in weighted
        assert (batch.weights[batch.inputs == assistant] == 1).all()
    splits = prepared.meta["splits"]
    assert n_examples == splits["train"]["examples"] + splits["eval"]["examples"]
    assert n_full and all_rows(prepared, "train").segment_ids.max() >= 2  # both boundary kinds were seen
    assert all_rows(prepared, "train").weights.sum() == splits["train"]["assistant_tokens"]


def test_multi_turn_weights_by_hand(tok):
    d = [Message(U, "Hi"), Message(A, "Hello"), Message(U, "Paris?"), Message(A, "Yes")]
    ids, mask = render(d, tok)
    row = row_arrays([(ids, mask)], len(ids) + 3, tok.pad_id, np.uint16)
    batch = row_batch(row["tokens"], row["segments"], row["mask"], tok.byte_lengths())
    weighted = batch.targets[batch.weights == 1]
    end = tok.specials["<|end|>"]
    assert weighted.tolist() == [*tok.encode("Hello"), end, *tok.encode("Yes"), end]
    assert tok.decode(weighted) == "HelloYes"  # specials decode to nothing
    assert batch.target_bytes[batch.weights == 1].sum() == len(b"HelloYes")


def test_truncated_away_examples_are_dropped_and_counted(tmp_path, tok):
    long_prompt = json.dumps({"messages": [{"role": U, "content": "Hello, how are you? " * 40},
                                           {"role": A, "content": "Fine."}]})
    cfg = config(tmp_path, n_dialogues=30, eval_fraction=0.1, extra=[long_prompt] * 5)
    prepared = prepared_sft(cfg, tmp_path / "p", tok)
    splits = prepared.meta["splits"]
    assert splits["train"]["dropped_truncated"] + splits["eval"]["dropped_truncated"] == 5
    assert prepared.meta["dialogues"] == 35 and splits["train"]["dialogues"] + splits["eval"]["dialogues"] == 35
    assert splits["eval"]["dialogues"] == round(35 * 0.1)


def test_prepare_is_reused_and_skips_are_counted(tmp_path, tok, capsys):
    bad = json.dumps({"messages": [{"role": U, "content": "no answer"}]})
    cfg = config(tmp_path, n_dialogues=20, extra=[bad])
    first = prepared_sft(cfg, tmp_path / "p", tok)
    assert first.meta["skipped"] == {"does not end with the assistant": 1}
    again = prepared_sft(cfg, tmp_path / "p", tok)
    assert "reusing" in capsys.readouterr().out and again.meta == first.meta
    with pytest.raises(Exception, match="seq_len"):
        prepare_sft(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=16)), tmp_path / "p", tok)
    with pytest.raises(Exception, match="prepared for data.seq_len=80"):
        first.rows("train", 16)


def test_a_missing_array_is_named_when_loading(tmp_path, tok):
    prepare_sft(config(tmp_path, n_dialogues=20), tmp_path / "p", tok)
    (tmp_path / "p" / "eval-mask.npy").unlink()
    with pytest.raises(DataError, match=f"^{tmp_path / 'p' / 'eval-mask.npy'}: missing \\(a damaged or partly "
                                        r"copied data directory\); prepare it again$"):
        PreparedSFT.load(tmp_path / "p")


def test_two_processes_make_the_global_batch(prepared):
    whole = task(8, 2, seed=3).train_source(prepared, 0, 1)
    parts = [task(8, 2, seed=3).train_source(prepared, p, 2) for p in (0, 1)]
    for _ in range(3):
        batch = whole.next_batch()
        assert batch.inputs.shape == (2, 4, SEQ_LEN)
        local = [p.next_batch() for p in parts]
        assert local[0].inputs.shape == (2, 2, SEQ_LEN)
        for k in range(len(TokenBatch._fields)):
            flat = lambda b: sorted(map(bytes, b[k].reshape(-1, SEQ_LEN)))  # noqa: E731 rows as sets
            assert flat(batch) == sorted(flat(local[0]) + flat(local[1]))
    evals = [task(4).eval_batches(prepared, p, 2, 0) for p in (0, 1)]
    full = task(4).eval_batches(prepared, 0, 1, 0)
    for b, (e0, e1) in enumerate(zip(*evals)):
        np.testing.assert_array_equal(full[b].inputs[0::2], e0.inputs)
        np.testing.assert_array_equal(full[b].inputs[1::2], e1.inputs)


def test_deterministic_by_seed(prepared):
    def first(seed):
        source = task(4, seed=seed).train_source(prepared, 0, 1)
        return [source.next_batch().inputs for _ in range(3)]
    np.testing.assert_array_equal(first(1), first(1))
    assert not np.array_equal(first(1), first(2))


def test_masked_loss_equals_hand_sum():
    a = (np.array([10, 11, 12, 13]), np.array([0, 0, 1, 1], bool))
    b = (np.array([20, 21, 22, 23, 24]), np.array([0, 0, 0, 1, 1], bool))
    byte_lengths = np.arange(32, dtype=np.int32) % 3
    rows = [row_arrays(r, 10, pad_id=0, dtype=np.uint16) for r in ([a, b], [b])]
    batch = stack([row_batch(r["tokens"], r["segments"], r["mask"], byte_lengths) for r in rows])
    logits = np.random.default_rng(0).normal(size=(2, 9, 32)).astype(np.float32)
    sums = weighted_sums(token_nats(jnp.asarray(logits), jnp.asarray(batch.targets)), batch)
    # assistant targets by hand: row 0 targets 12, 13 (positions 1, 2) and 23, 24 (6, 7); row 1: 23, 24 (2, 3)
    hand = [(0, 1, 12), (0, 2, 13), (0, 6, 23), (0, 7, 24), (1, 2, 23), (1, 3, 24)]
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    assert float(sums["nats"]) == pytest.approx(-sum(logp[r, t, v] for r, t, v in hand), rel=1e-5)
    assert float(sums["tokens"]) == 6
    assert float(sums["bytes"]) == sum(byte_lengths[v] for _, _, v in hand)


def test_a_tokenizer_without_chat_tokens_gets_text_tags_and_eos(tmp_path):
    """An imported model's sentencepiece (no reserved chat ids, no pad): tags become text, a turn ends with EOS."""
    import sentencepiece as spm
    from llm_jax.data.chat.template import tags as chat_tags
    from llm_jax.data.tokenizer import Tokenizer
    model = tmp_path / "foreign"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 4), model_prefix=str(model), vocab_size=320,
                                   model_type="bpe", byte_fallback=True, pad_id=-1, character_coverage=0.99,
                                   minloglevel=2)
    tok = Tokenizer.load(f"{model}.model")
    tags = chat_tags(tok)
    assert tags.end == tok.eos_id and tok.decode(list(tags.open["user"])).strip() == "<|user|>" and tags.note
    ids, mask = render([Message(U, "Hi"), Message(A, "Paris.")], tok)
    answer = list(tok.encode("Paris.")) + [tok.eos_id]
    assert ids[mask].tolist() == answer  # exactly the answer and the EOS that ends it are trained
    assert ids.tolist()[-len(answer) - len(tags.open["assistant"]):-len(answer)] == list(tags.open["assistant"])
    prepared = prepared_sft(config(tmp_path, n_dialogues=20), tmp_path / "p", f"{model}.model")
    batch = prepared.rows("train", SEQ_LEN)[0]
    assert batch.weights.sum() > 0 and (batch.inputs >= 0).all()
