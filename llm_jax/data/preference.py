"""Reward-model batches: pairs of answers to one prompt, the preferred (chosen) one and the rejected one.

Kinds of `kind:GLOB` source (GLOB as in corpus.py: relative to data_dir unless absolute, `**`, `.gz`):
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

Preparation (prepare_preference, once per data config and tokenizer):
  1. per source, its groups shuffled with the fixed SPLIT_SEED; the LAST max(1, round(n * data.eval_fraction))
     groups of that order are held out for eval, so a source's eval pairs do not change when sources are added
     and the pairs of one question never straddle the split; train and eval concatenate the sources in order;
  2. each pair rendered by render_pair to two sequences of at most seq_len tokens, prompt + answer + <|end|>;
     when the longer one does not fit, the prompt loses its oldest tokens (it keeps at least half of seq_len,
     all of it if shorter) and the answers their ends, the same prompt cut for both answers;
     a pair whose two sequences become identical is dropped and counted (dropped_truncated);
  3. per split: tokens (N, 2, seq_len), uint16 (uint32 for big vocabularies), row 0 chosen, row 1 rejected,
     right-padded with pad_id; lengths (N, 2) int32; margins (N,) float32.
The directory appears atomically and is reused when the fingerprint (sources, data_dir, eval_fraction,
seq_len, tokenizer sha256, FORMAT) matches.

A batch holds B pairs: inputs, positions (0.. on real tokens), segment_ids (1 on real tokens, 0 on padding),
all int32 (B, 2, seq_len); margin and valid float32 (B,), valid 0 only on the padding of a last eval batch.
The reward of a sequence is read at its last real token, <|end|>.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import grain
import numpy as np

from llm_jax.config import Config, data_dir
from llm_jax.data.chat_template import chat_tags, render_prompt
from llm_jax.data.corpus import DataError, glob_source, json_records
from llm_jax.data.dialogue import Message, _msg, dialogue_problem, hh_transcript, parse_messages
from llm_jax.data.pipeline import batch_iterator, ordered_batches
from llm_jax.data.prepare import NpyRows, PreparedDir
from llm_jax.data.sft import publish_chat_data
from llm_jax.data.tokenizer import Tokenizer

FORMAT = 1  # bump when the layout, the split or the truncation changes: old directories then stop matching
SPLIT_SEED = 0  # the train/eval split; fixed so that every run sees the same split
KEYS = ("inputs", "positions", "segment_ids", "margin", "valid")
ARRAYS = ("tokens", "lengths", "margins")
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

def iter_pair_groups(source: str, data_dir: Path, stats: PairStats | None = None) -> Iterator[list[Pair]]:
    """Yields, per record of one `kind:GLOB` source, its valid pairs (records with none are not yielded);
    unusable pairs are counted in stats.skipped by reason."""
    stats = PairStats() if stats is None else stats
    loader, paths = _resolve(source, Path(data_dir))
    for path in paths:
        for results in loader(path):
            stats.n_records += 1
            group = [r for r in results if isinstance(r, Pair)]
            stats.skipped.update(r for r in results if isinstance(r, str))
            stats.n_pairs += len(group)
            if group:
                yield group


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


# --- rendering -------------------------------------------------------------------------------------------

def render_answers(prompt: tuple[Message, ...], answers: list[str], tokenizer: Tokenizer,
                   seq_len: int) -> list[np.ndarray]:
    """int32 ids of prompt + answer + <|end|> for each answer, at most seq_len each, one prompt cut for all."""
    return _render(prompt, answers, tokenizer, seq_len)[0]


def render_pair(pair: Pair, tokenizer: Tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray] | str:
    """(chosen ids, rejected ids), or "identical after truncation" when the cut leaves nothing to compare."""
    return _render_pair(pair, tokenizer, seq_len)[0]


def _render(prompt: tuple[Message, ...], answers: list[str], tokenizer: Tokenizer,
            seq_len: int) -> tuple[list[np.ndarray], bool]:
    """render_answers, and whether anything was cut."""
    prompt_ids = render_prompt(list(prompt), tokenizer)
    answer_ids = tokenizer.encode_batch(answers)
    end = np.asarray(chat_tags(tokenizer)["end"], np.int32)
    room = seq_len - len(end)  # the end of the turn always stays: the reward is read there
    longest = max(map(len, answer_ids))
    # The answer replies to the latest turn, so the prompt loses its oldest tokens; it keeps half the room
    # (or all of it, if shorter) against a long answer, which then loses its end.
    keep = min(len(prompt_ids), max(room - longest, room // 2))
    head = prompt_ids[len(prompt_ids) - keep:]
    sequences = [np.concatenate([head, np.asarray(ids[:room - keep], np.int32), end]) for ids in answer_ids]
    return sequences, len(prompt_ids) + longest > room


def _render_pair(pair: Pair, tokenizer: Tokenizer, seq_len: int) -> tuple[tuple[np.ndarray, np.ndarray] | str, bool]:
    (chosen, rejected), cut = _render(pair.prompt, [pair.chosen, pair.rejected], tokenizer, seq_len)
    return ("identical after truncation" if np.array_equal(chosen, rejected) else (chosen, rejected)), cut


# --- rows ------------------------------------------------------------------------------------------------

class PairRows(NpyRows):
    """Prepared pairs as batch entries: (2, seq_len) ids, row 0 chosen, row 1 rejected, and scalars."""

    def row(self, a: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
        tokens = np.asarray(a["tokens"][index], np.int32)
        index_T = np.arange(tokens.shape[-1], dtype=np.int32)
        real = index_T < np.asarray(a["lengths"][index])[:, None]
        return {"inputs": tokens, "positions": np.where(real, index_T, 0).astype(np.int32),
                "segment_ids": real.astype(np.int32), "margin": np.asarray(a["margins"][index], np.float32),
                "valid": np.ones((), np.float32)}


def padding_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """The pair that fills a last, partial eval batch: valid 0, so it counts for nothing."""
    zeros = np.zeros((2, seq_len), np.int32)
    return {"inputs": zeros + pad_id, "positions": zeros, "segment_ids": zeros,
            "margin": np.zeros((), np.float32), "valid": np.zeros((), np.float32)}


# --- preparation -----------------------------------------------------------------------------------------

class PreparedPreference(PreparedDir):
    """Rendered preference pairs (train and eval splits)."""

    def rows(self, split: str, seq_len: int) -> PairRows:
        self.check_seq_len(seq_len)
        return self.nonempty(PairRows({k: self.path / f"{split}-{k}.npy" for k in ARRAYS}), split)


def prepare_preference(cfg: Config, out_dir: str | Path, tokenizer: Tokenizer | str | Path) -> PreparedPreference:
    """Renders cfg's preference pairs into out_dir, or reuses what an identical config left there."""
    out_dir = Path(out_dir)
    meta = publish_chat_data(cfg, out_dir, tokenizer, FORMAT, _prepare_into, "preference")
    if meta is None:
        return PreparedPreference.load(out_dir)
    s, d = meta["splits"], cfg.data
    print(f"prepared preference {out_dir}: {meta['records']} records, {meta['pairs']} pairs "
          f"(skipped: {meta['skipped']}; {s['train']['dropped_truncated'] + s['eval']['dropped_truncated']} "
          f"dropped by truncation), {s['train']['pairs']} train + {s['eval']['pairs']} eval pairs of 2 x "
          f"{d.seq_len} tokens, {s['train']['truncated'] + s['eval']['truncated']} truncated")
    return PreparedPreference.load(out_dir)


def _prepare_into(cfg: Config, tmp: Path, tokenizer: Tokenizer) -> dict:
    sources, root = cfg.data.sources, data_dir(cfg)
    for source in sources:
        _resolve(source, root)  # bad sources fail before any reading
    stats, splits = PairStats(), {"train": [], "eval": []}
    for source in sources:
        groups = list(iter_pair_groups(source, root, stats))
        order = np.random.default_rng(SPLIT_SEED).permutation(len(groups))
        n_eval = max(1, round(len(groups) * cfg.data.eval_fraction))
        for split, idx in (("train", order[:len(order) - n_eval]), ("eval", order[len(order) - n_eval:])):
            splits[split] += [(source, pair) for i in idx for pair in groups[i]]
    if not stats.n_pairs:
        raise DataError(f"data.sources={list(sources)} yielded no usable preference pair "
                        f"(skipped: {dict(stats.skipped)})")
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    return {"tokenizer_sha256": tokenizer.sha256, "seq_len": cfg.data.seq_len, "dtype": np.dtype(dtype).name,
            "records": stats.n_records, "pairs": stats.n_pairs, "skipped": dict(stats.skipped),
            "splits": {split: _write_split(pairs, sources, tokenizer, cfg.data.seq_len, tmp / split, dtype)
                       for split, pairs in splits.items()}}


def _write_split(pairs: list[tuple[str, Pair]], sources: tuple[str, ...], tokenizer: Tokenizer, seq_len: int,
                 prefix: Path, dtype) -> dict:
    rendered = [(source, pair.margin, *_render_pair(pair, tokenizer, seq_len)) for source, pair in pairs]
    kept = [r for r in rendered if not isinstance(r[2], str)]
    n = len(kept)
    tokens, lengths, margins = (np.lib.format.open_memmap(f"{prefix}-{k}.npy", "w+", t, shape)
                                for k, t, shape in zip(ARRAYS, (dtype, np.int32, np.float32),
                                                       ((n, 2, seq_len), (n, 2), (n,))))
    tokens[:] = tokenizer.pad_id
    for i, (_, margin, sequences, _) in enumerate(kept):
        for j, ids in enumerate(sequences):
            tokens[i, j, :len(ids)] = ids
            lengths[i, j] = len(ids)
        margins[i] = margin
    for a in (tokens, lengths, margins):
        a.flush()
    per_source = collections.Counter(source for source, *_ in kept)
    return {"pairs": n, "dropped_truncated": len(pairs) - n, "truncated": sum(cut for *_, cut in kept),
            "tokens": int(lengths[:].sum()),
            "sources": {source: per_source[source] for source in sources}}


# --- batches ---------------------------------------------------------------------------------------------

def train_iterator(prepared: PreparedPreference, seq_len: int, global_batch: int, microbatches: int, seed: int,
                   process_index: int, process_count: int, num_workers: int = 0) -> grain.DatasetIterator:
    """As pipeline.train_iterator, over pairs: global_batch counts pairs, each entry has a leading 2."""
    return batch_iterator(prepared.rows("train", seq_len), global_batch, microbatches, seed, process_index,
                          process_count, num_workers)


def eval_batches(prepared: PreparedPreference, seq_len: int, global_batch: int, process_index: int,
                 process_count: int, max_batches: int = 0) -> list[dict[str, np.ndarray]]:
    """The eval pairs in order, as this process's (local_batch, 2, seq_len) arrays; max_batches=0: all."""
    return ordered_batches(prepared.rows("eval", seq_len), global_batch, process_index, process_count,
                           max_batches, padding_row(seq_len, prepared.tokenizer.pad_id))
