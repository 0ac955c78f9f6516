"""Prompts for RL (PPO, GRPO): the dialogues a policy answers and a reward model scores, each a tuple of
Messages [system], user, assistant, ..., user awaiting its answer.

Kinds of `kind:GLOB` source (GLOB as in data/corpus.py: relative to data_dir unless absolute, `**`, `.gz`):
  hh:, pairs:, qa_feedback:  the prompt of each preference record (pairs.py) with a usable pair; split by
                             preference.split_pair_groups, so RL holds out exactly the prompts that the reward
                             model and DPO hold out
  alpaca:, chat:             the dialogues of dialogue.py without their final assistant answer (a chat: line
                             that ends with the user turn is already a prompt)
  prompts:GLOB               JSONL of {"prompt": text or [{"role", "content"}, ...]} or {"messages": [...]},
                             whose trailing assistant message, if any, is dropped
A malformed record is a DataError naming file:line; a prompt that is not [system], user, assistant, ..., user
with no empty turn is skipped and counted by reason in PromptStats (preference records count their skipped
pairs, as pairs.PairStats does). The other kinds split per source by prepared.split_indices, so a source's
eval prompts do not change when sources are added; each split holds the sources in the order given.

Prepared (prepare_prompts): per split `{split}-prompts.jsonl`, one JSON list of {"role", "content"} per line,
read back by PreparedPrompts.prompts; meta.json counts them per source.
"""
from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Callable, Iterator

from llm_jax.config import Config, data_dir
from llm_jax.data.chat import dialogue, pairs
from llm_jax.data.chat.dialogue import Message, dialogue_problem, parse_messages
from llm_jax.data.chat.pairs import PairStats, prompt_messages
from llm_jax.data.chat.preference import split_pair_groups
from llm_jax.data.chat.prepared import publish_chat_data, split_indices
from llm_jax.data.corpus import glob_source, jsonl_records
from llm_jax.data.shards import SPLITS, PreparedDir
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import DataError

FORMAT = 1  # bump when the layout or the split changes: old directories then stop matching
KINDS = ("hh", "pairs", "qa_feedback", "alpaca", "chat", "prompts")

Prompt = tuple[Message, ...]
Loader = Callable[[Path], Iterator[Prompt | str]]  # a file's prompts, or why each unusable one was skipped


@dataclasses.dataclass
class PromptStats:
    """Records read, prompts yielded and prompts skipped by reason (so nothing disappears silently)."""
    n_records: int = 0
    n_prompts: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)


# --- records ---------------------------------------------------------------------------------------------

def checked_prompt(prompt) -> Prompt | str:
    """The prompt as a tuple, or why it cannot be answered (dialogue_problem's reason)."""
    if [m.role for m in prompt] in ([], ["system"]):
        return "no turns"  # dialogue_problem would see only the appended answer, and call it out of turn
    return dialogue_problem([*prompt, Message("assistant", "answer")]) or tuple(prompt)


def as_prompt(turns: list[Message]) -> Prompt | str:
    """The prompt a dialogue asks: without its final assistant answer, or why it cannot be a prompt."""
    answered = bool(turns) and turns[-1].role == "assistant"
    return checked_prompt(turns[:-1] if answered else turns)


def prompt_records(path: Path) -> Iterator[Prompt | str]:
    for lineno, record in jsonl_records(Path(path)):
        where = f"{path}:{lineno}"
        if isinstance(record, dict) and "prompt" in record:
            yield checked_prompt(prompt_messages(record["prompt"], where))
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            yield as_prompt(parse_messages(record["messages"], where))
        else:
            raise DataError(f'{where}: expected {{"prompt": text or messages}} or {{"messages": [...]}}')


def _without_answers(kind: str) -> Loader:
    return lambda path: map(as_prompt, dialogue.LOADERS[kind](path))


LOADERS: dict[str, Loader] = {  # the kinds read here; the preference kinds are read by pairs.py
    "alpaca": _without_answers("alpaca"), "chat": _without_answers("chat"), "prompts": prompt_records}


# --- sources ---------------------------------------------------------------------------------------------

def split_prompts(sources: tuple[str, ...], root: Path, eval_fraction: float,
                  stats: PromptStats | None = None) -> dict[str, list[tuple[str, Prompt]]]:
    """Per split, the (source, prompt) of the sources' records, sources in the order given: the preference
    kinds split as split_pair_groups splits them (one prompt per group), the others per source by
    prepared.split_indices."""
    stats = PromptStats() if stats is None else stats
    root = Path(root)
    plans = {source: _resolve(source, root) for source in sources}  # bad sources fail before any reading
    by_source = {source: {split: [] for split in SPLITS} for source in sources}
    preference = tuple(source for source, (loader, _) in plans.items() if loader is None)
    if preference:  # all at once: the very split the reward model and DPO make of these sources
        pair_stats = PairStats()
        for split, groups in split_pair_groups(preference, root, eval_fraction, pair_stats).items():
            for source, group in groups:
                by_source[source][split].append(group[0].prompt)  # a group's pairs share their prompt
        stats.n_records += pair_stats.n_records
        stats.skipped.update(pair_stats.skipped)
    for source, (loader, paths) in plans.items():
        if loader is not None:
            prompts = _read(loader, paths, stats)
            for split, idx in split_indices(len(prompts), eval_fraction).items():
                by_source[source][split] = [prompts[i] for i in idx]
    splits = {split: [(source, p) for source in by_source for p in by_source[source][split]] for split in SPLITS}
    stats.n_prompts = sum(map(len, splits.values()))
    return splits


def _read(loader: Loader, paths: list[Path], stats: PromptStats) -> list[Prompt]:
    prompts = []
    for result in (result for path in paths for result in loader(path)):
        stats.n_records += 1
        if isinstance(result, str):
            stats.skipped[result] += 1
        else:
            prompts.append(result)
    return prompts


def _resolve(source: str, root: Path) -> tuple[Loader | None, list[Path]]:
    """The loader of a source (None for a preference kind, which pairs.py reads) and its files."""
    kind, _, pattern = source.partition(":")
    if kind not in KINDS:
        raise DataError(f"data.sources entry {source!r}: unknown prompt kind {kind!r} (known: {', '.join(KINDS)})")
    return (None if kind in pairs.LOADERS else LOADERS[kind]), glob_source(source, pattern, root)


# --- preparation -----------------------------------------------------------------------------------------

class PreparedPrompts(PreparedDir):
    """Prompts (train and eval splits), one JSON list of {"role", "content"} messages per line."""
    KIND = "prompts"

    def prompts_path(self, split: str) -> Path:
        return self.path / f"{split}-prompts.jsonl"

    def expected_sizes(self) -> list[tuple[Path, int | None]]:
        return [(self.prompts_path(split), self.meta["splits"][split]["bytes"]) for split in SPLITS]

    def prompts(self, split: str) -> list[Prompt]:
        # split("\n"), not splitlines(): the JSON keeps a raw U+2028, which splitlines would cut.
        lines = self.prompts_path(split).read_text(encoding="utf-8").split("\n")
        return [tuple(Message(m["role"], m["content"]) for m in json.loads(line)) for line in lines if line]


def prepare_prompts(cfg: Config, out_dir: str | Path, tokenizer: Tokenizer | str | Path) -> None:
    """Writes cfg's prompts into out_dir, unless an identical config left them there (PreparedPrompts.load
    reads them)."""
    out_dir = Path(out_dir)

    def describe(meta: dict) -> str:
        s = meta["splits"]
        return (f"prepared prompts {out_dir}: {meta['records']} records, {s['train']['prompts']} train + "
                f"{s['eval']['prompts']} eval prompts (skipped: {meta['skipped']})")
    publish_chat_data(cfg, out_dir, tokenizer, FORMAT, _prepare_into, PreparedPrompts, describe)


def _prepare_into(cfg: Config, tmp: Path, tokenizer: Tokenizer) -> dict:
    sources, stats = cfg.data.sources, PromptStats()
    splits = split_prompts(sources, data_dir(cfg), cfg.data.eval_fraction, stats)
    if not stats.n_prompts:
        raise DataError(f"data.sources={list(sources)} yielded no usable prompt (skipped: {dict(stats.skipped)})")
    return {"tokenizer_sha256": tokenizer.sha256, "seq_len": cfg.data.seq_len, "records": stats.n_records,
            "prompts": stats.n_prompts, "skipped": dict(stats.skipped),
            "splits": {split: _write_split(prompts, sources, tmp / f"{split}-prompts.jsonl")
                       for split, prompts in splits.items()}}


def _write_split(prompts: list[tuple[str, Prompt]], sources: tuple[str, ...], path: Path) -> dict:
    data = "".join(json.dumps([m._asdict() for m in prompt], ensure_ascii=False) + "\n"
                   for _, prompt in prompts).encode()
    path.write_bytes(data)
    per_source = collections.Counter(source for source, _ in prompts)
    return {"prompts": len(prompts), "bytes": len(data), "sources": {s: per_source[s] for s in sources}}
