"""Dialogue loaders (tiny synthetic files) and the chat template's ids and loss mask at every boundary."""
import gzip
import json

import numpy as np
import pytest

from llm_jax.data.chat.template import render, render_prompt, show, targets_and_weights
from llm_jax.errors import DataError
from llm_jax.data.chat.dialogue import (DialogueStats, Message, alpaca, chat_jsonl, dialogue_problem, hh_rlhf,
                                   hh_transcript, iter_dialogues, moss, oasst)
from llm_jax.data.tokenizer import train_tokenizer

U, A, S = "user", "assistant", "system"
CORPUS = ["What is the capital of France? The capital of France is Paris. Hello, how are you?\n" * 8,
          "床前明月光，疑是地上霜。举头望明月，低头思故乡。你好，请问今天天气怎么样？\n" * 8]
HH = ("\n\nHuman: what are some pranks with a pen i can do?\n\nAssistant: Are you looking for practical joke ideas?"
      "\n\nHuman: yep\n\nAssistant: Ok, here are two:\n\n1. Draw on a hand.\n\n2. Hide the cap."
      "\n\nHuman: okay\n\nAssistant: Have fun!")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(CORPUS, tmp_path_factory.mktemp("tok") / "tok", vocab_size=320)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())
    return path


def jsonl(*records):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# --- loaders ---------------------------------------------------------------------------------------------

def test_alpaca_input_appended_after_blank_line(tmp_path):
    path = write(tmp_path / "a.json.gz", json.dumps([
        {"instruction": "Add.", "input": "1 2", "output": " 3 "},
        {"instruction": "翻译", "input": "", "output": "好", "history": []},
        {"instruction": "Again?", "output": "Yes.", "history": [["Hi", "Hello"]]}]))
    assert list(alpaca(path)) == [
        [Message(U, "Add.\n\n1 2"), Message(A, "3")],
        [Message(U, "翻译"), Message(A, "好")],
        [Message(U, "Hi"), Message(A, "Hello"), Message(U, "Again?"), Message(A, "Yes.")]]


def test_alpaca_jsonl_and_errors_name_the_record(tmp_path):
    ok = write(tmp_path / "a.jsonl", jsonl({"instruction": "q", "output": "a"}))
    assert list(alpaca(ok)) == [[Message(U, "q"), Message(A, "a")]]
    bad = write(tmp_path / "b.json", json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q"}]))
    with pytest.raises(DataError, match=r"b\.json: record 1: not an Alpaca record"):
        list(alpaca(bad))
    bad = write(tmp_path / "c.jsonl", jsonl({"instruction": "q", "output": "a"}) + "\n" + '{"instruction": 3}\n')
    with pytest.raises(DataError, match=r"c\.jsonl:3: not an Alpaca"):
        list(alpaca(bad))
    bad = write(tmp_path / "d.json", '[{"instruction": "q",\n "output": 5}]')
    with pytest.raises(DataError, match=r"d\.json: record 0: assistant content is int"):
        list(alpaca(bad))


def test_chat_jsonl_roles_and_errors(tmp_path):
    path = write(tmp_path / "c.jsonl", jsonl({"messages": [
        {"role": S, "content": "Be brief."}, {"role": U, "content": "Hi"}, {"role": A, "content": "Hello"}]}))
    assert list(chat_jsonl(path)) == [[Message(S, "Be brief."), Message(U, "Hi"), Message(A, "Hello")]]
    bad = write(tmp_path / "d.jsonl", jsonl({"messages": []}, {"messages": [{"role": "bot", "content": "x"}]}))
    with pytest.raises(DataError, match=r"d\.jsonl:2: message role 'bot' is not one of system, user, assistant"):
        list(chat_jsonl(bad))
    bad = write(tmp_path / "e.jsonl", '{"messages": []}\n{not json\n')
    with pytest.raises(DataError, match=r"e\.jsonl:2: invalid JSON"):
        list(chat_jsonl(bad))


def test_hh_transcript_keeps_all_turns():
    turns = hh_transcript(HH)
    assert [m.role for m in turns] == [U, A, U, A, U, A]
    assert turns[0] == Message(U, "what are some pranks with a pen i can do?")
    assert turns[3] == Message(A, "Ok, here are two:\n\n1. Draw on a hand.\n\n2. Hide the cap.")
    assert turns[-1] == Message(A, "Have fun!")
    with pytest.raises(DataError, match="not an hh-rlhf transcript"):
        hh_transcript("Hello there")


def test_hh_rlhf_reads_chosen(tmp_path):
    path = write(tmp_path / "h.jsonl.gz", jsonl({"chosen": HH, "rejected": "\n\nHuman: a\n\nAssistant: b"}))
    assert list(hh_rlhf(path)) == [hh_transcript(HH)]
    bad = write(tmp_path / "i.jsonl", jsonl({"chosen": HH}, {"rejected": HH}))
    with pytest.raises(DataError, match=r"i\.jsonl:2: no string field 'chosen'"):
        list(hh_rlhf(bad))


def moss_record(*pairs):
    return json.dumps({"conversation_id": "1", "meta_instruction": "You are MOSS.", "num_turns": len(pairs),
                       "chat": {f"turn_{i}": {"Human": f"<|Human|>: {h}<eoh>\n",
                                              "Inner Thoughts": "<|Inner Thoughts|>: None<eot>\n",
                                              "Commands": "<|Commands|>: None<eoc>\n",
                                              "Tool Responses": "<|Results|>: None<eor>\n",
                                              "MOSS": f"<|MOSS|>: {m}<eom>\n"}
                                for i, (h, m) in enumerate(pairs, 1)}}, ensure_ascii=False)


def test_moss_strips_markup_file_or_dir(tmp_path):
    write(tmp_path / "m" / "b" / "c_2.json", moss_record(("Hi", "Hello\n\nthere")))
    first = write(tmp_path / "m" / "a" / "c_1.json", moss_record(("我想要提高写作", "多读多写。"), ("谢谢", "不客气")))
    assert list(moss(first)) == [[Message(U, "我想要提高写作"), Message(A, "多读多写。"),
                                  Message(U, "谢谢"), Message(A, "不客气")]]
    assert [d[0].content for d in moss(tmp_path / "m")] == ["我想要提高写作", "Hi"]  # sorted paths
    assert list(moss(tmp_path / "m" / "b" / "c_2.json"))[0][1] == Message(A, "Hello\n\nthere")
    bad = write(tmp_path / "bad.json", moss_record(("Hi", "x")).replace("<|MOSS|>: ", ""))
    with pytest.raises(DataError, match=r"bad\.json: chat\.turn_1\.MOSS does not start with '<\|MOSS\|>:'"):
        list(moss(bad))


def oasst_msg(mid, parent, role, text, rank=None, **extra):
    return {"message_id": mid, "parent_id": parent, "role": role, "text": text, "rank": rank, "deleted": False,
            "review_result": True, **extra}


def test_oasst_follows_best_ranked_path(tmp_path):
    path = write(tmp_path / "o.jsonl.gz", jsonl(
        oasst_msg("r", None, "prompter", "Q1"),
        oasst_msg("a2", "r", "assistant", "worse", rank=1),
        oasst_msg("a1", "r", "assistant", "best", rank=0),
        oasst_msg("a0", "r", "assistant", "unranked"),
        oasst_msg("ax", "r", "assistant", "deleted", rank=0, deleted=True),  # would tie: must be left out
        oasst_msg("p2", "a1", "prompter", "Q2"),
        oasst_msg("b1", "p2", "assistant", "A2"),
        oasst_msg("p3", "b1", "prompter", "Q3 unanswered"),
        oasst_msg("c", "a2", "prompter", "on the worse branch"),
        oasst_msg("orphan", "missing-root", "assistant", "no root"),
        oasst_msg("r2", None, "prompter", "never answered")))
    assert list(oasst(path)) == [[Message(U, "Q1"), Message(A, "best"), Message(U, "Q2"), Message(A, "A2")], []]
    bad = write(tmp_path / "p.jsonl", jsonl(oasst_msg("r", None, "prompter", "Q"), oasst_msg("a", "r", "bot", "x")))
    with pytest.raises(DataError, match=r"p\.jsonl:2: role 'bot'"):
        list(oasst(bad))


def test_iter_dialogues_counts_skipped(tmp_path):
    write(tmp_path / "chat" / "x.jsonl", jsonl(
        {"messages": [{"role": U, "content": "q"}, {"role": A, "content": "a"}]},
        {"messages": [{"role": A, "content": "a"}]},
        {"messages": [{"role": U, "content": "q"}, {"role": A, "content": "a"}, {"role": U, "content": "q"}]},
        {"messages": [{"role": U, "content": "q"}, {"role": A, "content": "  "}]},
        {"messages": [{"role": S, "content": "s"}, {"role": U, "content": "q"}, {"role": A, "content": "a"}]}))
    write(tmp_path / "hh.jsonl", jsonl({"chosen": HH}))
    stats = DialogueStats()
    out = list(iter_dialogues(("chat:chat/*.jsonl", "hh:hh.jsonl"), tmp_path, stats))
    assert [len(d) for d in out] == [2, 3, 6]
    assert stats.n_yielded == 3 and stats.n_skipped == 3
    assert stats.skipped == {"roles do not alternate user/assistant": 1, "does not end with the assistant": 1,
                             "empty turn": 1}


def test_iter_dialogues_bad_sources(tmp_path):
    pattern = r"'chat:nothing/\*\.jsonl': 'nothing/\*\.jsonl' matches no file in " + str(tmp_path)
    with pytest.raises(DataError, match=pattern):
        list(iter_dialogues(("chat:nothing/*.jsonl",), tmp_path))
    with pytest.raises(DataError, match="unknown dialogue kind 'sharegpt'"):
        list(iter_dialogues(("sharegpt:x.json",), tmp_path))


def test_dialogue_problem():
    assert dialogue_problem([Message(U, "q"), Message(A, "a")]) is None
    assert dialogue_problem([Message(S, "s")]) == "no turns"
    assert dialogue_problem([Message(U, "q"), Message(U, "q"), Message(A, "a")]) is not None


# --- chat template ---------------------------------------------------------------------------------------

def spans(tok, dialogue):
    """Expected (ids, mask) built turn by turn, by hand."""
    sp = tok.specials
    ids, mask = [], []
    for m in dialogue:
        content = tok.encode(m.content)
        ids += [sp[f"<|{m.role}|>"], *content, sp["<|end|>"]]
        mask += [False] + [m.role == A] * (len(content) + 1)
    return np.array(ids, np.int32), np.array(mask)


DIALOGUE = [Message(S, "Be brief."), Message(U, "What is the capital of France?"), Message(A, "Paris."),
            Message(U, "你好"), Message(A, "你好，请问")]


def test_render_matches_hand_layout_and_mask_boundaries(tok):
    sp = tok.specials
    ids, mask = render(DIALOGUE, tok)
    want_ids, want_mask = spans(tok, DIALOGUE)
    assert ids.dtype == np.int32 and mask.dtype == bool
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
    # Every <|assistant|> tag is unmasked, the token after it (first answer token) is masked, the
    # assistant's <|end|> is masked, and no tag or content of the user/system is.
    tags = np.flatnonzero(ids == sp["<|assistant|>"])
    assert len(tags) == 2 and not mask[tags].any() and mask[tags + 1].all()
    ends = np.flatnonzero(ids == sp["<|end|>"])
    assert mask[ends].tolist() == [False, False, True, False, True]
    assert tok.decode(ids[mask]) == "Paris.你好，请问"
    assert mask.sum() == sum(len(tok.encode(m.content)) + 1 for m in DIALOGUE if m.role == A)


def test_targets_and_weights_shift(tok):
    ids, mask = render(DIALOGUE[1:3], tok)
    inputs, targets, weights = targets_and_weights(ids, mask)
    assert len(inputs) == len(targets) == len(weights) == len(ids) - 1
    # The first weighted target is the first answer token, predicted from the <|assistant|> tag.
    first = np.argmax(weights)
    assert inputs[first] == tok.specials["<|assistant|>"] and targets[first] == tok.encode("Paris.")[0]
    assert targets[-1] == tok.specials["<|end|>"] and weights[-1]
    assert not mask[0]  # so weights = mask[1:] drops nothing


def test_truncation_mid_answer_and_all_answers(tok):
    ids, mask = render(DIALOGUE[1:3], tok)
    answer = np.flatnonzero(mask)
    cut = answer[0] + 2  # keeps two answer tokens, drops the rest and the <|end|>
    ids_c, mask_c = render(DIALOGUE[1:3], tok, max_len=cut)
    np.testing.assert_array_equal(ids_c, ids[:cut])
    np.testing.assert_array_equal(mask_c, mask[:cut])
    assert mask_c.sum() == 2 and mask_c.any()
    ids_c, mask_c = render(DIALOGUE[1:3], tok, max_len=answer[0])  # ends at the <|assistant|> tag
    assert len(ids_c) == answer[0] and ids_c[-1] == tok.specials["<|assistant|>"]
    assert not mask_c.any()  # nothing to learn: the caller drops and counts it
    np.testing.assert_array_equal(render(DIALOGUE, tok, max_len=10_000)[0], render(DIALOGUE, tok)[0])


def test_render_prompt_ends_with_assistant_tag(tok):
    prompt = render_prompt(DIALOGUE[:4], tok)
    assert prompt.dtype == np.int32 and prompt[-1] == tok.specials["<|assistant|>"]
    full, _ = render(DIALOGUE, tok)
    np.testing.assert_array_equal(full[:len(prompt)], prompt)  # training and inference agree
    with pytest.raises(ValueError, match="render_prompt needs"):
        render_prompt(DIALOGUE[:3], tok)


def test_chinese_and_literal_tags_round_trip(tok):
    dialogue = [Message(U, "床前明月光，疑是地上霜。<|end|>"), Message(A, "举头望明月，低头思故乡。😀")]
    ids, mask = render(dialogue, tok)
    assert tok.decode(ids) == "床前明月光，疑是地上霜。<|end|>举头望明月，低头思故乡。😀"  # tags decode to ""
    assert (ids == tok.specials["<|end|>"]).sum() == 2  # literal text never becomes a control token
    assert tok.decode(ids[mask]) == dialogue[1].content


def test_show_marks_exactly_the_trained_spans(tok):
    dialogue = [Message("user", "你好 cat"), Message("assistant", "the dog 猫"), Message("user", "more"),
                Message("assistant", "yes")]
    ids, mask = render(dialogue, tok)
    assert show(ids, mask, tok) == ("<|user|>你好 cat<|end|><|assistant|>⟦the dog 猫<|end|>⟧"
                                    "<|user|>more<|end|><|assistant|>⟦yes<|end|>⟧")
    # cut before the last <|end|>: the open span still closes
    assert show(ids[:-1], mask[:-1], tok).endswith("<|assistant|>⟦yes⟧")


def test_moss_zh_keeps_conversations_that_open_in_chinese(tmp_path):
    from llm_jax.data.chat.dialogue import is_chinese, moss_zh
    write(tmp_path / "zh.json", moss_record(("你好，请介绍一下北京", "北京是中国的首都。")))
    write(tmp_path / "en.json", moss_record(("Tell me about Paris", "Paris is in France.")))
    assert [d[0].content for d in moss_zh(tmp_path)] == ["你好，请介绍一下北京"]
    assert is_chinese("你好世界 hello") and not is_chinese("hello world 你") and not is_chinese("123")
