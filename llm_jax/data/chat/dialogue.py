"""Dialogues for SFT: each `kind:GLOB` source of SFT data becomes a stream of `list[Message]`.

Kinds (GLOB relative to data_dir unless absolute, `**` recursive, `.gz` gunzipped, as in corpus.py):
  alpaca:GLOB   Alpaca JSON list (or JSONL) of {instruction, input, output}; a non-empty `history`
                ([[user, assistant], ...], ChatGLM style) becomes earlier turns
  chat:GLOB     JSONL, one {"messages": [{"role", "content"}, ...]} per line
  hh:GLOB       hh-rlhf JSONL; the `chosen` transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." of each line
  moss:GLOB     MOSS-003 conversation JSON, one per file; `chat.turn_i.Human/MOSS` with the markup stripped
                (the MOSS meta_instruction, a MOSS-specific system prompt, is not kept)
  oasst:GLOB    oasst1 message JSONL; from each root prompt the best-ranked reply path (deleted or
                review-failed messages left out; a path's trailing unanswered prompt dropped)
Content is stripped of surrounding whitespace. Files are read in sorted path order, sources in the order
given. A malformed record is a DataError naming file:line (or the file and record index of a JSON list);
a well-formed dialogue that is not user/assistant alternation ending with the assistant is skipped and
counted in DialogueStats.
"""
from __future__ import annotations

import collections
import dataclasses
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

from llm_jax.data.corpus import glob_source, json_records, jsonl_records, read_json
from llm_jax.errors import DataError

ROLES = ("system", "user", "assistant")
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ \t]?")
_MOSS_TAG = {"Human": re.compile(r"^\s*<\|Human\|>:\s?(.*?)\s*(<eoh>)?\s*$", re.DOTALL),
             "MOSS": re.compile(r"^\s*<\|MOSS\|>:\s?(.*?)\s*(<eom>)?\s*$", re.DOTALL)}


class Message(NamedTuple):
    role: str  # one of ROLES
    content: str


@dataclasses.dataclass
class DialogueStats:
    """What iter_dialogues yielded and what it skipped, by reason (so nothing disappears silently)."""
    n_yielded: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


def iter_dialogues(sources: tuple[str, ...], data_dir: Path,
                   stats: DialogueStats | None = None) -> Iterator[list[Message]]:
    """Yields the valid dialogues of all sources; invalid ones are counted in stats.skipped by reason."""
    stats = DialogueStats() if stats is None else stats
    plans = [_resolve(source, Path(data_dir)) for source in sources]  # bad sources fail before any reading
    for loader, paths in plans:
        for path in paths:
            for dialogue in loader(path):
                problem = dialogue_problem(dialogue)
                if problem:
                    stats.skipped[problem] += 1
                    continue
                stats.n_yielded += 1
                yield dialogue


def dialogue_problem(dialogue: list[Message]) -> str | None:
    """None for a trainable dialogue: [system], user, assistant, user, ..., assistant, none empty."""
    roles = [m.role for m in dialogue]
    if roles[:1] == ["system"]:
        roles = roles[1:]
    if not roles:
        return "no turns"
    if any(not m.content for m in dialogue):
        return "empty turn"
    if roles != ["user", "assistant"] * (len(roles) // 2) + ["user"] * (len(roles) % 2):
        return "roles do not alternate user/assistant"
    return "does not end with the assistant" if len(roles) % 2 else None


def _resolve(source: str, data_dir: Path) -> tuple[Callable[[Path], Iterator[list[Message]]], list[Path]]:
    kind, _, pattern = source.partition(":")
    if kind not in LOADERS:
        raise DataError(f"data.sources entry {source!r}: unknown dialogue kind {kind!r} "
                        f"(known: {', '.join(LOADERS)})")
    return LOADERS[kind], glob_source(source, pattern, data_dir)


def _msg(role: str, content, where: str) -> Message:
    if not isinstance(content, str):
        raise DataError(f"{where}: {role} content is {type(content).__name__}, not a string")
    return Message(role, content.strip())


def alpaca(path: Path) -> Iterator[list[Message]]:
    for where, record in json_records(Path(path)):
        if not isinstance(record, dict) or "instruction" not in record or "output" not in record:
            raise DataError(f"{where}: not an Alpaca record (needs 'instruction' and 'output')")
        prompt = _msg("user", record["instruction"], where).content
        extra = _msg("user", record.get("input") or "", where).content
        turns = []
        for pair in record.get("history") or []:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise DataError(f"{where}: 'history' must be a list of [user, assistant] pairs")
            turns += [_msg("user", pair[0], where), _msg("assistant", pair[1], where)]
        user = f"{prompt}\n\n{extra}" if extra else prompt
        yield turns + [Message("user", user), _msg("assistant", record["output"], where)]


def chat_jsonl(path: Path) -> Iterator[list[Message]]:
    for lineno, record in jsonl_records(Path(path)):
        where = f"{path}:{lineno}"
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list):
            raise DataError(f"{where}: expected an object with a 'messages' list")
        yield parse_messages(messages, where)


def parse_messages(messages: list, where: str) -> list[Message]:
    """[{"role", "content"}, ...] as Messages; DataError naming `where` for a bad role or content."""
    dialogue = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise DataError(f"{where}: message role {role!r} is not one of {', '.join(ROLES)}")
        dialogue.append(_msg(m["role"], m.get("content"), where))
    return dialogue


def hh_transcript(text: str) -> list[Message]:
    """Turns of an hh-rlhf transcript "\\n\\nHuman: ...\\n\\nAssistant: ..." (all turns, in order)."""
    parts = _HH_TURN.split(text)  # [before, speaker, content, speaker, content, ...]
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"not an hh-rlhf transcript (should start with '\\n\\nHuman:'): {text[:40]!r}")
    return [Message("user" if speaker == "Human" else "assistant", content.strip())
            for speaker, content in zip(parts[1::2], parts[2::2])]


def hh_rlhf(path: Path) -> Iterator[list[Message]]:
    for lineno, record in jsonl_records(Path(path)):
        if not isinstance(record, dict) or not isinstance(record.get("chosen"), str):
            raise DataError(f"{path}:{lineno}: no string field 'chosen' in this record")
        try:
            yield hh_transcript(record["chosen"])
        except DataError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None


def moss(path_or_dir: Path) -> Iterator[list[Message]]:
    path_or_dir = Path(path_or_dir)
    for path in sorted(path_or_dir.rglob("*.json")) if path_or_dir.is_dir() else [path_or_dir]:
        record = read_json(path)
        chat = record.get("chat") if isinstance(record, dict) else None
        if not isinstance(chat, dict):
            raise DataError(f"{path}: not a MOSS conversation (no 'chat' object)")
        dialogue = []
        for i in range(1, len(chat) + 1):
            turn = chat.get(f"turn_{i}")
            if not isinstance(turn, dict):
                raise DataError(f"{path}: chat.turn_{i} is missing or not an object")
            for key, role in (("Human", "user"), ("MOSS", "assistant")):
                match = _MOSS_TAG[key].match(_msg(role, turn.get(key), f"{path}: chat.turn_{i}.{key}").content)
                if not match:
                    raise DataError(f"{path}: chat.turn_{i}.{key} does not start with '<|{key}|>:'")
                dialogue.append(Message(role, match[1]))
        yield dialogue


def oasst(path: Path) -> Iterator[list[Message]]:
    """Best-ranked path of each oasst1 tree: at every turn the reply of lowest rank (unranked last)."""
    roots, children = [], collections.defaultdict(list)
    for lineno, m in jsonl_records(Path(path)):
        where = f"{path}:{lineno}"
        if not isinstance(m, dict) or not {"message_id", "parent_id", "role", "text"} <= m.keys():
            raise DataError(f"{where}: not an oasst1 message (needs message_id, parent_id, role, text)")
        if m["role"] not in ("prompter", "assistant"):
            raise DataError(f"{where}: role {m['role']!r} is neither 'prompter' nor 'assistant'")
        if m.get("deleted") or m.get("review_result") is False:
            continue  # withdrawn or rejected by oasst1's reviewers: not a reply to learn from
        m = dict(m, where=where)
        (roots if m["parent_id"] is None else children[m["parent_id"]]).append(m)
    for root in roots:  # file order, which is deterministic
        yield _best_path(root, children)


def _best_path(root: dict, children: dict[str, list[dict]]) -> list[Message]:
    dialogue, m = [], root
    while m is not None:
        dialogue.append(_msg("user" if m["role"] == "prompter" else "assistant", m["text"], m["where"]))
        replies = children.get(m["message_id"], [])
        # min() keeps the first of equal keys, so ties (e.g. all unranked) go to the earliest in the file.
        m = min(replies, key=lambda r: (r.get("rank") is None, r.get("rank") or 0), default=None)
    if dialogue[-1].role == "user":
        dialogue.pop()  # a prompt nobody has answered yet: the path ends with the last answer
    return dialogue


def is_chinese(text: str) -> bool:
    """Whether CJK ideographs make up at least a third of the letters (MOSS marks no language per file)."""
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum("\u4e00" <= c <= "\u9fff" for c in letters) * 3 >= len(letters)


def moss_zh(path_or_dir: Path) -> Iterator[list[Message]]:
    """The MOSS conversations that open in Chinese."""
    return (d for d in moss(path_or_dir) if d and is_chinese(d[0].content))


LOADERS: dict[str, Callable[[Path], Iterable[list[Message]]]] = {
    "alpaca": alpaca, "chat": chat_jsonl, "hh": hh_rlhf, "moss": moss, "moss_zh": moss_zh, "oasst": oasst}
