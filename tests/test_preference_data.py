"""Preference pairs: hh-rlhf, generic and qa-feedback records, the truncation rule, prepared rows, splits, batches."""
import json
import re

import numpy as np
import pytest

from llm_jax.config import Config, DataConfig, TrainConfig
from llm_jax.data.batches import stack
from llm_jax.data.chat.dialogue import Message
from llm_jax.data.chat.pairs import Pair, PairStats, iter_pair_groups, parse_pair
from llm_jax.data.chat.preference import PreparedPreference, prepare_preference, render_answers, render_pair
from llm_jax.data.chat.sft import PreparedSFT
from llm_jax.data.prepare import Prepared
from llm_jax.data.chat.template import render_prompt
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.errors import DataError
from llm_jax.tasks.reward import RewardModel

U, A, S = "user", "assistant", "system"
CORPUS = ["What is the answer to question one? The answer is two. I do not know. Hello, how are you today?\n" * 8,
          "Why do you think frogs are ugly? Have you ever seen one up close? Be brief and kind.\n" * 8]
SEQ_LEN = 48

# Lines 649, 1508 and 1880 of hh-rlhf harmless-base test, unchanged.
HELLO = {"chosen": "\n\nHuman: Hello, How are you?\n\nAssistant: Hello, I’m doing quite well.",
         "rejected": "\n\nHuman: Hello, How are you?\n\nAssistant: Hello, I am doing well. What is your name?"}
FROGS = {"chosen": "\n\nHuman: Why are frogs so ugly?\n\nAssistant: Why do you think they’re ugly?",
         "rejected": "\n\nHuman: Why are frogs so ugly?\n\nAssistant: Have you ever seen one up close?"}
WOODCHUCK = {
    "chosen": "\n\nHuman: How much wood do you think can a woodchuck chuck?\n\nAssistant: I don’t know. Why do you "
              "want to know?\n\nHuman: of course you dont know\n\nAssistant: oh?  so the woodchuck is a “fictional "
              "creature” from the",
    "rejected": "\n\nHuman: How much wood do you think can a woodchuck chuck?\n\nAssistant: I don’t know. Why do you "
                "want to know?\n\nHuman: of course you dont know\n\nAssistant: why dont you ask someone else?"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "tok", vocab_size=320)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# --- records ---------------------------------------------------------------------------------------------

def pair_groups(source, data_dir, stats=None):
    """The pair groups of one source's records."""
    return [group for _, group in iter_pair_groups((source,), data_dir, stats)]


def test_hh_rlhf_real_pairs():
    assert parse_pair(HELLO, "x") == Pair((Message(U, "Hello, How are you?"),), "Hello, I’m doing quite well.",
                                          "Hello, I am doing well. What is your name?", 0.0)
    assert parse_pair(FROGS, "x") == Pair((Message(U, "Why are frogs so ugly?"),),
                                          "Why do you think they’re ugly?", "Have you ever seen one up close?")
    pair = parse_pair(WOODCHUCK, "x")
    assert pair.prompt == (Message(U, "How much wood do you think can a woodchuck chuck?"),
                           Message(A, "I don’t know. Why do you want to know?"),
                           Message(U, "of course you dont know"))
    assert (pair.chosen, pair.rejected) == ("oh?  so the woodchuck is a “fictional creature” from the",
                                            "why dont you ask someone else?")


def test_unusable_hh_pairs_give_reasons():
    differ = dict(WOODCHUCK, rejected=WOODCHUCK["rejected"].replace("of course", "well"))
    assert parse_pair(differ, "x") == "prompts differ"
    unanswered = dict(FROGS, rejected=FROGS["rejected"] + "\n\nHuman: Yes.")
    assert parse_pair(unanswered, "x") == "does not end with the assistant"
    assert parse_pair(dict(FROGS, chosen=FROGS["chosen"].split("Assistant:")[0] + "Assistant: "),
                      "x") == "empty answer"
    assert parse_pair(dict(FROGS, rejected=FROGS["chosen"] + "  "), "x") == "identical answers"
    with pytest.raises(DataError, match=r"^f.jsonl:3: not an hh-rlhf transcript"):
        parse_pair({"chosen": "Hi", "rejected": "Ho"}, "f.jsonl:3")


def test_generic_forms(tmp_path):
    system = [{"role": S, "content": "Be brief."}, {"role": U, "content": "Hi"}]
    records = [{"prompt": " What is two? ", "chosen": " Two. ", "rejected": "Three.", "margin": 1.5},
               {"prompt": system, "chosen": [{"role": A, "content": "Hello!"}],
                "rejected": [{"role": A, "content": "Go away."}]},
               {"prompt": [{"role": A, "content": "Hi"}], "chosen": "a", "rejected": "b"},
               {"prompt": "Why?", "chosen": "Same", "rejected": " Same"},
               {"prompt": "Why?", "chosen": "", "rejected": "b"},
               HELLO]
    write_jsonl(tmp_path / "p.jsonl", records)
    stats = PairStats()
    groups = pair_groups("pairs:*.jsonl", tmp_path, stats)
    assert groups == [[Pair((Message(U, "What is two?"),), "Two.", "Three.", 1.5)],
                      [Pair((Message(S, "Be brief."), Message(U, "Hi")), "Hello!", "Go away.", 0.0)],
                      [parse_pair(HELLO, "x")]]
    assert (stats.n_records, stats.n_pairs, stats.n_skipped) == (6, 3, 3)
    assert stats.skipped == {"roles do not alternate user/assistant": 1, "identical answers": 1, "empty answer": 1}


@pytest.mark.parametrize("line, error", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt": "Hi", "chosen": "a"}', "'rejected' must be a text"),
    ('{"prompt": "Hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}', "'chosen' must be"),
    ('{"prompt": "Hi", "chosen": "a", "rejected": "b", "margin": "big"}', "'margin' is 'big'"),
    ('{"prompt": "Hi", "chosen": "a", "rejected": "b", "margin": NaN}', "not a finite number"),
    ('{"prompt": [{"role": "bot", "content": "Hi"}], "chosen": "a", "rejected": "b"}', "role 'bot'"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', "prompt is int"),
    ('{"chosen": "a"}', "hh-rlhf"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, error):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "chosen": "a", "rejected": "b"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: .*{re.escape(error)}"):
        pair_groups(f"pairs:{path}", tmp_path)


def test_unknown_kind_fails_before_reading(tmp_path):
    with pytest.raises(DataError, match=r"'nope:x'.*known: hh, pairs, qa_feedback"):
        pair_groups("nope:x", tmp_path)


def qa_record(k, labels, predictions=None):
    predictions = predictions or [f"Answer {k}.{p}" for p in range(1, 5)]
    return {"question": f"Question {k}?", "preference": labels, "passages": [], "gold": "",
            **{f"prediction {p}": text for p, text in enumerate(predictions, 1)}}


def test_qa_feedback_expands_labels(tmp_path):
    records = [qa_record(0, [1, 2, 0, 1, 0, 2]),
               qa_record(1, [2, 0, 0, 0, 0, 1], ["a", "b", "same", "same"])]
    (tmp_path / "qa.json").write_text(json.dumps(records))
    stats = PairStats()
    groups = pair_groups("qa_feedback:qa.json", tmp_path, stats)
    assert [[(p.chosen, p.rejected) for p in g] for g in groups] == [
        [("Answer 0.1", "Answer 0.2"), ("Answer 0.3", "Answer 0.1"), ("Answer 0.2", "Answer 0.3"),
         ("Answer 0.4", "Answer 0.3")],
        [("b", "a")]]
    assert groups[0][0].prompt == (Message(U, "Question 0?"),) and groups[0][0].margin == 0.0
    assert (stats.n_records, stats.n_pairs) == (2, 5) and stats.skipped == {"tie": 6, "identical answers": 1}
    (tmp_path / "qa.json").write_text(json.dumps([records[0], qa_record(1, [1, 2])]))
    with pytest.raises(DataError, match=r"qa.json: record 1: 'preference' must be a list of 6"):
        pair_groups("qa_feedback:qa.json", tmp_path)


# --- rendering -------------------------------------------------------------------------------------------

def test_render_fits_uncut(tok):
    prompt = (Message(S, "Be brief."), Message(U, "Hello, how are you?"))
    chosen, rejected = render_answers(prompt, ["I am fine.", "Go away."], tok, SEQ_LEN)
    end, head = tok.specials["<|end|>"], render_prompt(list(prompt), tok).tolist()
    assert chosen.tolist() == head + tok.encode("I am fine.") + [end] and chosen.dtype == np.int32
    assert rejected.tolist() == head + tok.encode("Go away.") + [end]


@pytest.mark.parametrize("long_answer", [False, True])
def test_render_cuts_prompt_from_the_left_and_answers_at_the_end(tok, long_answer):
    prompt = (Message(U, "What is the answer to question one? " * 3), Message(A, "I do not know."),
              Message(U, "Why do you think frogs are ugly?"))
    answers = ["The answer is two. " * (6 if long_answer else 1), "Hello."]
    full_prompt, ids = render_prompt(list(prompt), tok).tolist(), tok.encode_batch(answers)
    assert len(full_prompt) + len(ids[0]) >= SEQ_LEN  # the longest does not fit
    long, short = render_answers(prompt, answers, tok, SEQ_LEN)
    assert len(long) == SEQ_LEN and long[-1] == short[-1] == tok.specials["<|end|>"]
    keep = SEQ_LEN // 2 - 1 if long_answer else SEQ_LEN - 1 - len(ids[0])  # half the room, or all it leaves
    head = full_prompt[len(full_prompt) - keep:]
    assert long[:keep].tolist() == short[:keep].tolist() == head  # the same latest prompt tokens for both
    assert long[keep:-1].tolist() == ids[0][:SEQ_LEN - 1 - keep]  # the answer keeps its start
    assert short[keep:-1].tolist() == ids[1]


def test_identical_after_truncation(tok):
    prompt = (Message(U, "Hello, how are you today? " * 4),)
    same_start = Pair(prompt, "The answer is two. " * 8 + "Yes.", "The answer is two. " * 8 + "No.")
    assert render_pair(same_start, tok, SEQ_LEN) == "identical after truncation"
    chosen, rejected = render_pair(same_start, tok, 200)
    assert chosen[-3:].tolist() != rejected[-3:].tolist()


# --- prepared data ---------------------------------------------------------------------------------------

def pair_record(k):
    """Varied pairs: some with a system prompt or earlier turns, some long enough to be cut, a few margins."""
    prompt = [{"role": S, "content": "Be brief."}] if k % 3 == 0 else []
    if k % 4 == 1:
        prompt += [{"role": U, "content": "Hello."}, {"role": A, "content": "Hello, how are you today?"}]
    prompt.append({"role": U, "content": f"What is the answer to question {k}?"})
    return {"prompt": prompt, "chosen": f"The answer is {k}." * (1 + 8 * (k % 7 == 6)),
            "rejected": f"I do not know {k}.", "margin": float(k % 3)}


def config(tmp_path, sources=("pairs:pairs.jsonl",), n_pairs=40, n_questions=10):
    write_jsonl(tmp_path / "pairs.jsonl", [pair_record(k) for k in range(n_pairs)])
    (tmp_path / "qa.json").write_text(json.dumps([qa_record(k, [1, 2, 1, 0, 2, 1]) for k in range(n_questions)]))
    data = DataConfig(sources=sources, data_dir=str(tmp_path), seq_len=SEQ_LEN,
                      eval_fraction=0.2)
    return Config(task="reward", data=data)


def prepared_pairs(cfg, out, tok) -> PreparedPreference:
    prepare_preference(cfg, out, tok)
    return PreparedPreference.load(out)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tok):
    tmp = tmp_path_factory.mktemp("pref")
    return prepared_pairs(config(tmp), tmp / "prepared", tok)


def all_rows(prepared, split):
    rows = prepared.rows(split, SEQ_LEN)
    return stack([rows[i] for i in range(len(rows))])


def task(batch_size, microbatches=1):
    """The reward-model task with this batch shape: its batch source and eval batches are the loop's way in."""
    return RewardModel(Config(task="reward", data=DataConfig(seq_len=SEQ_LEN),
                              train=TrainConfig(batch_size=batch_size, microbatches=microbatches)))


def test_rows_hold_the_rendered_pairs(prepared, tok):
    expected = {}
    for k in range(40):
        pair = parse_pair(pair_record(k), "x")
        expected[tuple(np.concatenate(render_pair(pair, tok, SEQ_LEN)).tolist())] = pair.margin
    splits, seen = prepared.meta["splits"], []
    assert prepared.meta["dtype"] == "uint16" and splits["eval"]["pairs"] == round(40 * 0.2)
    n_cut = sum(max(map(len, render_pair(parse_pair(pair_record(k), "x"), tok, 999))) > SEQ_LEN for k in range(40))
    assert 0 < n_cut < 40 and splits["train"]["truncated"] + splits["eval"]["truncated"] == n_cut
    for split in ("train", "eval"):
        rows = all_rows(prepared, split)
        n = splits[split]["pairs"]
        assert {k: (v.shape, v.dtype) for k, v in rows._asdict().items()} == {
            "inputs": ((n, 2, SEQ_LEN), np.int32), "positions": ((n, 2, SEQ_LEN), np.int32),
            "segment_ids": ((n, 2, SEQ_LEN), np.int32), "margin": ((n,), np.float32), "valid": ((n,), np.float32)}
        real = rows.segment_ids == 1
        lengths = real.sum(-1)
        assert (real == (np.arange(SEQ_LEN) < lengths[..., None])).all()  # right-padded
        assert (rows.inputs[~real] == tok.pad_id).all() and not rows.positions[~real].any()
        assert (rows.positions == np.where(real, np.arange(SEQ_LEN), 0)).all()
        assert (rows.valid == 1).all() and lengths.sum() == splits[split]["tokens"]
        for inputs, length, margin in zip(rows.inputs, lengths, rows.margin):
            key = tuple(inputs[0, :length[0]].tolist() + inputs[1, :length[1]].tolist())
            assert expected[key] == margin
            seen.append(key)
    assert sorted(seen) == sorted(expected)  # every pair exactly once


def test_a_source_split_does_not_move_when_sources_are_added(tmp_path, tok):
    one = prepared_pairs(config(tmp_path), tmp_path / "one", tok)
    both_cfg = config(tmp_path, sources=("pairs:pairs.jsonl", "qa_feedback:qa.json"))
    both = prepared_pairs(both_cfg, tmp_path / "both", tok)
    for split in ("train", "eval"):
        n = one.meta["splits"][split]["pairs"]
        assert both.meta["splits"][split]["sources"]["pairs:pairs.jsonl"] == n
        np.testing.assert_array_equal(all_rows(both, split).inputs[:n], all_rows(one, split).inputs)
    questions = {}  # a question's 5 labelled pairs all land in one split
    for split in ("train", "eval"):
        for inputs in all_rows(both, split).inputs:
            match = re.search(r"Question (\d+)\?", tok.decode(inputs[0]))
            if match:
                questions.setdefault(match[1], set()).add(split)
    assert len(questions) == 10 and all(len(splits) == 1 for splits in questions.values())
    assert both.meta["splits"]["eval"]["sources"]["qa_feedback:qa.json"] == 5 * round(10 * 0.2)
    assert both.meta["skipped"] == {"tie": 10} and both.meta["records"] == 50


def test_prepare_is_reused_and_checks_seq_len(tmp_path, tok, capsys):
    cfg = config(tmp_path, n_pairs=12)
    first = prepared_pairs(cfg, tmp_path / "p", tok)
    assert "prepared preference" in capsys.readouterr().out
    again = prepared_pairs(cfg, tmp_path / "p", tok)
    assert "reusing prepared preference pairs" in capsys.readouterr().out and again.meta == first.meta
    with pytest.raises(DataError, match="prepared for data.seq_len=48"):
        first.rows("train", 16)


def test_no_usable_pair_is_an_error(tmp_path, tok):
    cfg = config(tmp_path, sources=("qa_feedback:qa.json",), n_questions=2)
    (tmp_path / "qa.json").write_text(json.dumps([qa_record(0, [0] * 6)]))
    with pytest.raises(DataError, match=r"qa_feedback:qa.json.*no usable preference pair.*'tie': 6"):
        prepare_preference(cfg, tmp_path / "p", tok)


def test_prepared_data_of_another_kind_is_refused(prepared):
    """data.prepared pointing at another task's data is a one-line error, not a KeyError later."""
    with pytest.raises(DataError, match="holds preference pairs, not the packed dialogues this task trains on"):
        PreparedSFT.load(prepared.path)
    with pytest.raises(DataError, match="holds preference pairs, not the token shards"):
        Prepared.load(prepared.path)


def test_batches(prepared, tok):
    n_eval = prepared.meta["splits"]["eval"]["pairs"]  # 8: the last of 3 batches of 3 has one padding pair
    batches = task(3).eval_batches(prepared, 0, 1, 0)
    assert len(batches) == 3 and batches[0].inputs.shape == (3, 2, SEQ_LEN) and batches[0].margin.shape == (3,)
    assert sum(b.valid.sum() for b in batches) == n_eval and batches[-1].valid.tolist() == [1, 1, 0]
    pad = type(batches[-1])(*(v[-1] for v in batches[-1]))
    assert (pad.inputs == tok.pad_id).all() and not pad.segment_ids.any() and pad.margin == 0
    batch = task(4, 2).train_source(prepared, 0, 1).next_batch()
    assert {k: v.shape for k, v in batch._asdict().items()} == {
        "inputs": (2, 2, 2, SEQ_LEN), "positions": (2, 2, 2, SEQ_LEN), "segment_ids": (2, 2, 2, SEQ_LEN),
        "margin": (2, 2), "valid": (2, 2)}
    assert (batch.valid == 1).all()
