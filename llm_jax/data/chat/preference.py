"""Preference data: pairs (pairs.py) rendered through the chat template, read as PairBatch rows by a reward
model and as PairTokenBatch rows by DPO.

Preparation (prepare_preference, once per data config and tokenizer):
  1. per source, its groups split by prepared.split_indices (shuffled with the fixed SPLIT_SEED, the LAST
     max(1, round(n * data.eval_fraction)) groups of that order held out for eval), so a source's eval pairs
     do not change when sources are added and the pairs of one question never straddle the split; train and
     eval concatenate the sources in order;
  2. each pair rendered by render_pair to two sequences of at most seq_len tokens, prompt + answer + end of turn;
     when the longer one does not fit, the prompt loses its oldest tokens (it keeps at least half of seq_len,
     all of it if shorter) and the answers their ends, the same prompt cut for both answers;
     a pair whose two sequences become identical is dropped and counted (dropped_truncated);
  3. per split: tokens (N, 2, seq_len), uint16 (uint32 for big vocabularies), row 0 chosen, row 1 rejected,
     right-padded with pad_id; lengths (N, 2) int32; margins (N,) float32; prompt_lengths (N,) int32, the
     tokens of the (cut) prompt that starts both sequences.
The directory appears atomically and is reused when the fingerprint (sources, data_dir, eval_fraction,
seq_len, chat template, tokenizer sha256, FORMAT) matches.

Rows are data/batches.PairBatch: inputs, positions (0.. on real tokens), segment_ids (1 on real tokens, 0 on
padding) of shape (2, seq_len); margin and valid scalars. The reward of a sequence is read at its last real
token, the end of its turn (<|end|>, [SEP] or <|im_end|>, by data.chat_template). DPO's rows
(PreparedAnswerPairs) are data/batches.PairTokenBatch: the same sequences with their next-token targets,
weighted 1 on the answer's tokens and its end of turn only.
"""
from __future__ import annotations

import collections
from pathlib import Path

import numpy as np

from llm_jax.config import Config, data_dir
from llm_jax.data.batches import PairBatch, PairTokenBatch, positions_from_segments, stack
from llm_jax.data.chat import sft
from llm_jax.data.chat.dialogue import Message
from llm_jax.data.chat.pairs import Pair, PairStats, iter_pair_groups
from llm_jax.data.chat.prepared import publish_chat_data, split_indices
from llm_jax.data.chat.template import render_prompt, tags
from llm_jax.data.shards import NpyRows, PreparedArrays, token_dtype
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import DataError

FORMAT = 2  # bump when the layout, the split or the truncation changes: old directories then stop matching


# --- rendering -------------------------------------------------------------------------------------------

def render_answers(prompt: tuple[Message, ...], answers: list[str], tokenizer: Tokenizer,
                   seq_len: int, template: str = "") -> list[np.ndarray]:
    """int32 ids of prompt + answer + the end of the turn for each answer, at most seq_len each, one prompt cut
    for all, through the chat `template`."""
    return _render(prompt, answers, tokenizer, seq_len, template)[0]


def render_pair(pair: Pair, tokenizer: Tokenizer, seq_len: int,
                template: str = "") -> tuple[np.ndarray, np.ndarray] | str:
    """(chosen ids, rejected ids), or "identical after truncation" when the cut leaves nothing to compare."""
    return _render_pair(pair, tokenizer, seq_len, template)[0]


def _render(prompt: tuple[Message, ...], answers: list[str], tokenizer: Tokenizer,
            seq_len: int, template: str) -> tuple[list[np.ndarray], bool, int]:
    """render_answers, whether anything was cut, and the length of the (cut) prompt that starts each one."""
    prompt_ids = render_prompt(list(prompt), tokenizer, template)
    answer_ids = tokenizer.encode_batch(answers)
    end = np.asarray([tags(tokenizer, template).end], np.int32)
    room = seq_len - len(end)  # the end of the turn always stays: the reward is read there
    longest = max(map(len, answer_ids))
    # The answer replies to the latest turn, so the prompt loses its oldest tokens; it keeps half the room
    # (or all of it, if shorter) against a long answer, which then loses its end.
    keep = min(len(prompt_ids), max(room - longest, room // 2))
    head = prompt_ids[len(prompt_ids) - keep:]
    sequences = [np.concatenate([head, np.asarray(ids[:room - keep], np.int32), end]) for ids in answer_ids]
    return sequences, len(prompt_ids) + longest > room, keep


def _render_pair(pair: Pair, tokenizer: Tokenizer, seq_len: int,
                 template: str) -> tuple[tuple[np.ndarray, np.ndarray] | str, bool, int]:
    (chosen, rejected), cut, prompt_len = _render(pair.prompt, [pair.chosen, pair.rejected], tokenizer, seq_len,
                                                  template)
    return ("identical after truncation" if np.array_equal(chosen, rejected) else (chosen, rejected)), cut, prompt_len


# --- rows ------------------------------------------------------------------------------------------------

class PairRows(NpyRows):
    """Prepared pairs as PairBatch rows: (2, seq_len) ids, row 0 chosen, row 1 rejected, and scalars."""

    def row(self, a: dict[str, np.ndarray], index: int) -> PairBatch:
        tokens_2xT, segment_ids_2xT = _sequences(a, index)
        return PairBatch(inputs=tokens_2xT, positions=positions_from_segments(segment_ids_2xT),
                         segment_ids=segment_ids_2xT, margin=np.asarray(a["margins"][index], np.float32),
                         valid=np.ones((), np.float32))


class AnswerRows(NpyRows):
    """Prepared pairs as PairTokenBatch rows: each sequence predicts its next tokens, weighted on the answer
    (its tokens after the prompt, the closing end of turn included); the last position has no target."""

    def __init__(self, paths: dict[str, Path], byte_lengths_V: np.ndarray):
        super().__init__(paths)
        self.byte_lengths_V = byte_lengths_V

    def row(self, a: dict[str, np.ndarray], index: int) -> PairTokenBatch:
        tokens_2xT, segment_ids_2xT = _sequences(a, index)
        answer_2xT = segment_ids_2xT * (np.arange(tokens_2xT.shape[-1]) >= a["prompt_lengths"][index])
        # One padding token after each sequence: its last position gets no target, and rows stay seq_len long.
        rows = [sft.row_batch(*(np.append(x, 0) for x in sequence), self.byte_lengths_V)
                for sequence in zip(tokens_2xT, segment_ids_2xT, answer_2xT)]
        return PairTokenBatch(*stack(rows), valid=np.ones((), np.float32))


def _sequences(a: dict[str, np.ndarray], index: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, segment ids) of pair `index`, each (2, seq_len): segment 1 on real tokens, 0 on padding."""
    tokens_2xT = np.asarray(a["tokens"][index], np.int32)
    index_T = np.arange(tokens_2xT.shape[-1], dtype=np.int32)
    return tokens_2xT, (index_T < np.asarray(a["lengths"][index])[:, None]).astype(np.int32)


# --- preparation -----------------------------------------------------------------------------------------

class PreparedPreference(PreparedArrays):
    """Rendered preference pairs (train and eval splits)."""
    KIND = "preference pairs"
    ARRAYS = ("tokens", "lengths", "margins", "prompt_lengths")

    def row_source(self, paths: dict[str, Path]) -> PairRows:
        return PairRows(paths)


class PreparedAnswerPairs(PreparedPreference):
    """The same prepared pairs, read as the answers' next-token targets (DPO)."""

    def row_source(self, paths: dict[str, Path]) -> AnswerRows:
        return AnswerRows(paths, self.tokenizer.byte_lengths())


def prepare_preference(cfg: Config, out_dir: str | Path, tokenizer: Tokenizer | str | Path) -> None:
    """Renders cfg's preference pairs into out_dir, unless an identical config left them there
    (PreparedPreference.load reads them)."""
    out_dir = Path(out_dir)

    def describe(meta: dict) -> str:
        s = meta["splits"]
        return (f"prepared preference {out_dir}: {meta['records']} records, {meta['pairs']} pairs "
                f"(skipped: {meta['skipped']}; {s['train']['dropped_truncated'] + s['eval']['dropped_truncated']} "
                f"dropped by truncation), {s['train']['pairs']} train + {s['eval']['pairs']} eval pairs of 2 x "
                f"{cfg.data.seq_len} tokens, {s['train']['truncated'] + s['eval']['truncated']} truncated")
    publish_chat_data(cfg, out_dir, tokenizer, FORMAT, _prepare_into, PreparedPreference, describe)


def split_pair_groups(sources: tuple[str, ...], root: Path, eval_fraction: float,
                      stats: PairStats | None = None) -> dict[str, list[tuple[str, list[Pair]]]]:
    """Per split, the (source, group of pairs) of the sources' records: per source, its groups split by
    prepared.split_indices; sources in order. Training and `llm-jax compare` hold out the same groups."""
    by_source = {source: [] for source in sources}
    for source, group in iter_pair_groups(sources, root, stats):
        by_source[source].append(group)
    splits = {"train": [], "eval": []}
    for source, groups in by_source.items():
        for split, idx in split_indices(len(groups), eval_fraction).items():
            splits[split] += [(source, groups[i]) for i in idx]
    return splits


def _prepare_into(cfg: Config, tmp: Path, tokenizer: Tokenizer) -> dict:
    sources, stats = cfg.data.sources, PairStats()
    splits = {split: [(source, pair) for source, group in groups for pair in group]
              for split, groups in split_pair_groups(sources, data_dir(cfg), cfg.data.eval_fraction, stats).items()}
    if not stats.n_pairs:
        raise DataError(f"data.sources={list(sources)} yielded no usable preference pair "
                        f"(skipped: {dict(stats.skipped)})")
    dtype = token_dtype(tokenizer.vocab_size)
    return {"tokenizer_sha256": tokenizer.sha256, "seq_len": cfg.data.seq_len, "dtype": dtype.name,
            "records": stats.n_records, "pairs": stats.n_pairs, "skipped": dict(stats.skipped),
            "splits": {split: _write_split(pairs, cfg, tokenizer, tmp / split, dtype)
                       for split, pairs in splits.items()}}


def _write_split(pairs: list[tuple[str, Pair]], cfg: Config, tokenizer: Tokenizer, prefix: Path, dtype) -> dict:
    sources, seq_len = cfg.data.sources, cfg.data.seq_len
    rendered = [(source, pair.margin, *_render_pair(pair, tokenizer, seq_len, cfg.data.chat_template))
                for source, pair in pairs]
    kept = [r for r in rendered if not isinstance(r[2], str)]
    n = len(kept)
    tokens, lengths, margins, prompt_lengths = (
        np.lib.format.open_memmap(f"{prefix}-{k}.npy", "w+", t, shape)
        for k, t, shape in zip(PreparedPreference.ARRAYS, (dtype, np.int32, np.float32, np.int32),
                               ((n, 2, seq_len), (n, 2), (n,), (n,))))
    tokens[:] = tokenizer.pad_id
    for i, (_, margin, sequences, _, prompt_len) in enumerate(kept):
        for j, ids in enumerate(sequences):
            tokens[i, j, :len(ids)] = ids
            lengths[i, j] = len(ids)
        margins[i], prompt_lengths[i] = margin, prompt_len
    for a in (tokens, lengths, margins, prompt_lengths):
        a.flush()
    per_source = collections.Counter(source for source, *_ in kept)
    return {"pairs": n, "dropped_truncated": len(pairs) - n, "truncated": sum(cut for *_, cut, _ in kept),
            "tokens": int(lengths[:].sum()),
            "sources": {source: per_source[source] for source in sources}}
