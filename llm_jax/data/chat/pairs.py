"""Preference pairs: two answers to one prompt, the one people preferred (chosen) and the other (rejected).

Kinds of `kind:GLOB` source (GLOB as in data/corpus.py: relative to data_dir unless absolute, `**`, `.gz`):
  hh:GLOB           hh-rlhf JSONL: {"chosen", "rejected"} transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..."
                    that share every turn before their final assistant turn (the prompt)
  pairs:GLOB        JSONL (or a JSON list) of {"prompt", "chosen", "rejected"[, "margin"]}: the prompt a text
                    or a list of {"role", "content"} messages, an answer a text or TRL's conversational
                    [{"role": "assistant", "content": ...}]; hh-rlhf records are accepted too
  qa_feedback:GLOB  FineGrainedRLHF qa-feedback JSON list: the 6 judged pairs of "prediction 1".."prediction 4"
                    answering "question" (the grounding passages are not shown); a tie is skipped
A record gives a group of pairs (one, or up to 6 for qa_feedback). A malformed record is a DataError naming
file:line (file: record i for a JSON list); a well-formed but unusable pair (answers empty or identical, a
prompt that is not [system], user, assistant, ..., user) is skipped and counted by reason in PairStats.
Rendering and preparation for a reward model: preference.py.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from llm_jax.data.chat.dialogue import Message, _msg, dialogue_problem, hh_transcript, parse_messages
from llm_jax.data.corpus import glob_source, json_records
from llm_jax.errors import DataError

QA_PAIRS = ((1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4))  # the predictions each qa-feedback label compares
QA_FIELDS = ("question", "prediction 1", "prediction 2", "prediction 3", "prediction 4", "preference")


class Pair(NamedTuple):
    prompt: tuple[Message, ...]  # [system], user, assistant, ..., user: a dialogue awaiting its answer
    chosen: str  # the preferred assistant answer
    rejected: str
    margin: float = 0.0  # how much chosen is preferred, when the data says (else 0)


Loader = Callable[[Path], Iterator[list[Pair | str]]]  # a file's records, each as its pairs or skip reasons


@dataclasses.dataclass
class PairStats:
    """Records read, pairs yielded and pairs skipped by reason (so nothing disappears silently)."""
    n_records: int = 0
    n_pairs: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


# --- records ---------------------------------------------------------------------------------------------

def prompt_messages(value, where: str) -> tuple[Message, ...]:
    """A prompt given as a text (one user turn) or as a list of {"role", "content"} messages."""
    if isinstance(value, str):
        return (Message("user", value.strip()),)
    if not isinstance(value, list):
        raise DataError(f"{where}: the prompt is {type(value).__name__}, not a text or a list of messages")
    return tuple(parse_messages(value, where))


def parse_pair(record, where: str) -> Pair | str:
    """The Pair of a generic or hh-rlhf record, or the reason it cannot be used; DataError if malformed."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, not {type(record).__name__}")
    margin = _margin(record, where)
    if "prompt" in record:
        prompt = prompt_messages(record["prompt"], where)
        return _checked(prompt, _answer(record, "chosen", where), _answer(record, "rejected", where), margin)
    if not (isinstance(record.get("chosen"), str) and isinstance(record.get("rejected"), str)):
        raise DataError(f"{where}: expected 'prompt', 'chosen' and 'rejected', or hh-rlhf 'chosen' and "
                        "'rejected' transcripts")
    chosen, rejected = _transcript(record["chosen"], where), _transcript(record["rejected"], where)
    if chosen[-1].role != "assistant" or rejected[-1].role != "assistant":
        return "does not end with the assistant"
    if chosen[:-1] != rejected[:-1]:
        return "prompts differ"
    return _checked(tuple(chosen[:-1]), chosen[-1].content, rejected[-1].content, margin)


def _checked(prompt: tuple[Message, ...], chosen: str, rejected: str, margin: float) -> Pair | str:
    """The Pair, or why it is unusable: a prompt not awaiting an answer, an empty answer, identical answers."""
    problem = dialogue_problem([*prompt, Message("assistant", "x")])
    if problem:
        return problem
    if not chosen or not rejected:
        return "empty answer"
    if chosen == rejected:
        return "identical answers"
    return Pair(prompt, chosen, rejected, margin)


def _margin(record: dict, where: str) -> float:
    margin = record.get("margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
        raise DataError(f"{where}: 'margin' is {margin!r}, not a finite number")
    return float(margin)


def _answer(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    turn = value[0] if isinstance(value, list) and len(value) == 1 else None
    if isinstance(turn, dict) and turn.get("role") == "assistant":
        value = turn.get("content")  # TRL's conversational form
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a text or [{{'role': 'assistant', 'content': text}}]")
    return value.strip()


def _transcript(text: str, where: str) -> list[Message]:
    try:
        return hh_transcript(text)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None


# --- sources ---------------------------------------------------------------------------------------------

def iter_pair_groups(sources: tuple[str, ...], data_dir: Path,
                     stats: PairStats | None = None) -> Iterator[tuple[str, list[Pair]]]:
    """Yields (source, its valid pairs) per record of the `kind:GLOB` sources, in order (records with none are
    not yielded); unusable pairs are counted in stats.skipped by reason."""
    stats = PairStats() if stats is None else stats
    plans = [(source, *_resolve(source, Path(data_dir))) for source in sources]  # bad sources fail before reading
    for source, loader, paths in plans:
        for path in paths:
            for results in loader(path):
                stats.n_records += 1
                group = [r for r in results if isinstance(r, Pair)]
                stats.skipped.update(r for r in results if isinstance(r, str))
                stats.n_pairs += len(group)
                if group:
                    yield source, group


def _resolve(source: str, data_dir: Path) -> tuple[Loader, list[Path]]:
    kind, _, pattern = source.partition(":")
    if kind not in LOADERS:
        raise DataError(f"data.sources entry {source!r}: unknown preference kind {kind!r} "
                        f"(known: {', '.join(LOADERS)})")
    return LOADERS[kind], glob_source(source, pattern, data_dir)


def pair_records(path: Path) -> Iterator[list[Pair | str]]:
    for where, record in json_records(Path(path)):
        yield [parse_pair(record, where)]


def qa_feedback(path: Path) -> Iterator[list[Pair | str]]:
    for where, record in json_records(Path(path)):
        if not isinstance(record, dict) or not set(QA_FIELDS) <= record.keys():
            raise DataError(f"{where}: not a qa-feedback record (needs {', '.join(QA_FIELDS)})")
        labels = record["preference"]
        if not (isinstance(labels, list) and len(labels) == len(QA_PAIRS)
                and all(type(label) is int and label in (0, 1, 2) for label in labels)):
            raise DataError(f"{where}: 'preference' must be a list of {len(QA_PAIRS)} labels 0, 1 or 2")
        prompt = (_msg("user", record["question"], f"{where}: 'question'"),)
        answers = {k: _msg("assistant", record[f"prediction {k}"], f"{where}: 'prediction {k}'").content
                   for k in range(1, 5)}
        results = []
        for (a, b), label in zip(QA_PAIRS, labels):
            chosen, rejected = (a, b) if label == 1 else (b, a)
            results.append(_checked(prompt, answers[chosen], answers[rejected], 0.0) if label else "tie")
        yield results


LOADERS: dict[str, Loader] = {
    "hh": pair_records, "pairs": pair_records, "qa_feedback": qa_feedback}
