"""RL prompts: every source kind, skipped prompts, the split (the preference kinds' is the reward model's), the
prepared directory."""
import json
import re

import pytest

from llm_jax.config import Config, DataConfig
from llm_jax.data.chat.dialogue import Message
from llm_jax.data.chat.preference import split_pair_groups
from llm_jax.data.chat.prompts import PreparedPrompts, PromptStats, prepare_prompts, split_prompts
from llm_jax.data.tokenizer import train_tokenizer
from llm_jax.errors import DataError

U, A, S = "user", "assistant", "system"
HH = "\n\nHuman: {q}\n\nAssistant: {a}"


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    corpus = ["What is the answer to question one? The answer is two. Hello, how are you today?\n" * 8]
    return train_tokenizer(corpus, tmp_path_factory.mktemp("tok") / "tok", vocab_size=300)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def msgs(*turns):
    """[{"role", "content"}, ...] of (role, content) pairs."""
    return [{"role": role, "content": content} for role, content in turns]


def chat(k, turns=2):
    """A dialogue of `turns` alternating turns (user first), its texts numbered by k."""
    return {"messages": msgs(*((U, f"Question {k}.{t}?") if t % 2 == 0 else (A, f"Answer {k}.{t}.")
                               for t in range(turns)))}


def pair(k):
    return {"prompt": f"Question {k}?", "chosen": f"Answer {k}.", "rejected": "No."}


def hh(k):
    return {"chosen": HH.format(q=f"Why {k}?", a="Because."), "rejected": HH.format(q=f"Why {k}?", a="No.")}


def qa(k, labels):
    return {"question": f"Who is {k}?", **{f"prediction {i}": f"Person {i}." for i in range(1, 5)},
            "preference": labels}


def in_order(splits, sources):
    """The (source, prompt) of `sources` only, per split."""
    return {split: [(s, p) for s, p in items if s in sources] for split, items in splits.items()}


def test_every_kind(tmp_path):
    (tmp_path / "alpaca.json").write_text(json.dumps([
        {"instruction": "Translate.", "input": "Bonjour", "output": "Hello", "history": [["Hi", "Hello!"]]}]))
    write_jsonl(tmp_path / "answered.jsonl", [{"messages": msgs((S, "Be brief."), (U, "Hi"), (A, "Hello!"))}])
    write_jsonl(tmp_path / "open.jsonl", [chat(1, turns=3)])
    write_jsonl(tmp_path / "text.jsonl", [{"prompt": " What is two? "}])
    write_jsonl(tmp_path / "messages.jsonl", [{"messages": msgs((U, "Q"), (A, "A"), (U, "Q2"), (A, "A2"))}])
    write_jsonl(tmp_path / "hh.jsonl", [hh(1)])
    write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": msgs((S, "Be kind."), (U, "Hi")), "chosen": "a",
                                            "rejected": "b"}])
    (tmp_path / "qa.json").write_text(json.dumps([qa(1, [1, 2, 1, 0, 2, 1])]))
    sources = ("alpaca:alpaca.json", "chat:answered.jsonl", "chat:open.jsonl", "prompts:text.jsonl",
               f"prompts:{tmp_path}/messages.jsonl", "hh:hh.jsonl", "pairs:pairs.jsonl", "qa_feedback:qa.json")
    stats = PromptStats()
    splits = split_prompts(sources, tmp_path, 0.1, stats)
    expected = [(Message(U, "Hi"), Message(A, "Hello!"), Message(U, "Translate.\n\nBonjour")),
                (Message(S, "Be brief."), Message(U, "Hi")),
                (Message(U, "Question 1.0?"), Message(A, "Answer 1.1."), Message(U, "Question 1.2?")),
                (Message(U, "What is two?"),),
                (Message(U, "Q"), Message(A, "A"), Message(U, "Q2")),
                (Message(U, "Why 1?"),),
                (Message(S, "Be kind."), Message(U, "Hi")),
                (Message(U, "Who is 1?"),)]
    # One prompt per source: split_indices holds out at least one, so all are eval, in source order.
    assert splits == {"train": [], "eval": list(zip(sources, expected))}
    assert (stats.n_records, stats.n_prompts, stats.skipped) == (8, 8, {"tie": 1})


def test_invalid_prompts_are_skipped_and_counted(tmp_path):
    write_jsonl(tmp_path / "chat.jsonl", [
        chat(1), {"messages": msgs((A, "Hello!"))}, {"messages": msgs((U, "Hi"), (U, "Hi?"), (A, "Yes."))},
        {"messages": msgs((S, "Be brief."))}, {"messages": msgs((U, " "), (A, "What?"))}, {"messages": []},
        {"messages": msgs((U, "Hi"), (A, ""))}])
    write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": ""}, {"prompt": msgs((U, "Hi"), (A, "Hello!"))}, {"messages": msgs((A, "Hi"))},
        {"prompt": msgs((S, "Be brief."), (U, "Hi"))}])
    stats = PromptStats()
    splits = split_prompts(("chat:chat.jsonl", "prompts:prompts.jsonl"), tmp_path, 0.5, stats)
    assert sorted(p for items in splits.values() for _, p in items) == [
        (Message(S, "Be brief."), Message(U, "Hi")), (Message(U, "Hi"),), (Message(U, "Question 1.0?"),)]
    assert (stats.n_records, stats.n_prompts) == (11, 3)
    assert stats.skipped == {"no turns": 4, "roles do not alternate user/assistant": 2, "empty turn": 2}


@pytest.mark.parametrize("kind, line, error", [
    ("prompts", "{not json", "invalid JSON"),
    ("prompts", '{"text": "Hi"}', 'expected {"prompt": text or messages} or {"messages": [...]}'),
    ("prompts", '{"messages": "Hi"}', "expected {"),
    ("prompts", '{"prompt": 3}', "the prompt is int"),
    ("prompts", '{"messages": [{"role": "bot", "content": "Hi"}]}', "role 'bot'"),
    ("chat", "{not json", "invalid JSON"),
    ("pairs", "{not json", "invalid JSON"),
])
def test_malformed_lines_name_file_and_line(tmp_path, kind, line, error):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "Hi", "chosen": "a", "rejected": "b", **chat(0)}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:2: .*{re.escape(error)}"):
        split_prompts((f"{kind}:bad.jsonl",), tmp_path, 0.1)


def test_unknown_kind_fails_before_reading(tmp_path):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match=r"'oasst:x'.*unknown prompt kind.*known: hh, pairs, qa_feedback, alpaca, "
                                        r"chat, prompts\)$"):
        split_prompts(("prompts:bad.jsonl", "oasst:x"), tmp_path, 0.1)


def test_preference_prompts_are_held_out_as_the_reward_model_holds_them_out(tmp_path):
    write_jsonl(tmp_path / "pairs.jsonl", [pair(k) for k in range(30)] + [dict(pair(99), rejected="Answer 99.")])
    write_jsonl(tmp_path / "hh.jsonl", [hh(k) for k in range(20)])
    write_jsonl(tmp_path / "chat.jsonl", [chat(k) for k in range(10)])
    (tmp_path / "qa.json").write_text(json.dumps([qa(k, [1, 2, 1, 0, 2, 1]) for k in range(10)]))
    preference = ("pairs:pairs.jsonl", "qa_feedback:qa.json", "hh:hh.jsonl")
    stats = PromptStats()
    splits = split_prompts(("pairs:pairs.jsonl", "chat:chat.jsonl", "qa_feedback:qa.json", "hh:hh.jsonl"),
                           tmp_path, 0.2, stats)
    groups = split_pair_groups(preference, tmp_path, 0.2)
    assert len(groups["eval"]) == 6 + 2 + 4
    assert in_order(splits, preference) == {split: [(s, g[0].prompt) for s, g in items]
                                            for split, items in groups.items()}
    assert [s for s, _ in splits["eval"]] == ["pairs:pairs.jsonl"] * 6 + ["chat:chat.jsonl"] * 2 + [
        "qa_feedback:qa.json"] * 2 + ["hh:hh.jsonl"] * 4
    assert (stats.n_records, stats.n_prompts, stats.skipped) == (71, 70, {"identical answers": 1, "tie": 10})


def test_train_and_eval_are_disjoint_and_complete(tmp_path):
    write_jsonl(tmp_path / "chat.jsonl", [chat(k) for k in range(17)])
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Prompt {k}"} for k in range(9)])
    splits = split_prompts(("chat:chat.jsonl", "prompts:prompts.jsonl"), tmp_path, 0.25)
    expected = {"chat:chat.jsonl": {(Message(U, f"Question {k}.0?"),) for k in range(17)},
                "prompts:prompts.jsonl": {(Message(U, f"Prompt {k}"),) for k in range(9)}}
    for source, prompts in expected.items():
        train, eval_ = ([p for s, p in splits[split] if s == source] for split in ("train", "eval"))
        assert len(eval_) == round(len(prompts) * 0.25) and not set(train) & set(eval_)
        assert len(train) + len(eval_) == len(prompts) and set(train) | set(eval_) == prompts


def test_a_source_split_does_not_move_when_sources_are_added(tmp_path):
    write_jsonl(tmp_path / "chat.jsonl", [chat(k) for k in range(20)])
    write_jsonl(tmp_path / "pairs.jsonl", [pair(k) for k in range(20)])
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Prompt {k}"} for k in range(12)])
    write_jsonl(tmp_path / "hh.jsonl", [hh(k) for k in range(8)])
    alone = split_prompts(("chat:chat.jsonl", "pairs:pairs.jsonl"), tmp_path, 0.2)
    more = split_prompts(("prompts:prompts.jsonl", "hh:hh.jsonl", "pairs:pairs.jsonl", "chat:chat.jsonl"),
                         tmp_path, 0.2)
    for source in ("chat:chat.jsonl", "pairs:pairs.jsonl"):
        assert in_order(more, {source}) == in_order(alone, {source})
        assert len(in_order(alone, {source})["eval"]) == 4


def config(tmp_path, sources=("chat:chat.jsonl", "pairs:pairs.jsonl")):
    write_jsonl(tmp_path / "chat.jsonl", [chat(k, turns=2 + k % 2) for k in range(12)] + [{"messages": []}])
    moon = {"prompt": "明月\u2028几时有？", "chosen": "是", "rejected": "否"}  # U+2028 stays raw in the jsonl
    write_jsonl(tmp_path / "pairs.jsonl", [pair(k) for k in range(8)] + [moon])
    return Config(data=DataConfig(sources=sources, data_dir=str(tmp_path), seq_len=48, eval_fraction=0.25))


def test_prepare_round_trip_and_reuse(tmp_path, tok, capsys):
    cfg = config(tmp_path)
    prepare_prompts(cfg, tmp_path / "p", tok)
    assert capsys.readouterr().out.strip().endswith(
        f"prepared prompts {tmp_path / 'p'}: 22 records, 16 train + 5 eval prompts (skipped: {{'no turns': 1}})")
    prepared = PreparedPrompts.load(tmp_path / "p")
    expected = split_prompts(cfg.data.sources, tmp_path, 0.25)
    for split in ("train", "eval"):
        assert prepared.prompts(split) == [p for _, p in expected[split]]
    assert (prepared.tokenizer.sha256, prepared.meta["records"], prepared.meta["prompts"]) == (tok.sha256, 22, 21)
    assert prepared.meta["splits"]["eval"]["sources"] == {"chat:chat.jsonl": 3, "pairs:pairs.jsonl": 2}
    assert (Message(U, "明月\u2028几时有？"),) in prepared.prompts("train") + prepared.prompts("eval")

    prepare_prompts(cfg, tmp_path / "p", tok)
    assert "reusing prepared prompts" in capsys.readouterr().out
    assert PreparedPrompts.load(tmp_path / "p").meta == prepared.meta

    path = tmp_path / "p" / "train-prompts.jsonl"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: .* bytes, .* expected"):
        PreparedPrompts.load(tmp_path / "p")


def test_no_prompt_at_all_is_an_error(tmp_path, tok):
    cfg = config(tmp_path, sources=("prompts:empty.jsonl",))
    write_jsonl(tmp_path / "empty.jsonl", [{"prompt": ""}])
    with pytest.raises(DataError, match=r"data.sources=\['prompts:empty.jsonl'\] yielded no usable prompt "
                                        r"\(skipped: {'empty turn': 1}\)"):
        prepare_prompts(cfg, tmp_path / "p", tok)
