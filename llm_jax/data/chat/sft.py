"""SFT batches: whole dialogues rendered by the chat template, packed into rows, loss on assistant tokens only.

Rows are pretraining's TokenBatch (data/batches.py), so the objective is unchanged: the loss divides summed
nats*weights by sum(weights) over the whole batch, and weights are 1.0 exactly on targets that are assistant
tokens (content and the token that closes the turn: <|end|>, [SEP] or <|im_end|> by data.chat_template), 0
elsewhere.

Preparation (prepare_sft, once per data config and tokenizer):
  1. every dialogue of iter_dialogues, in order, rendered by template.render(d, tok, max_len=seq_len + 1)
     through data.chat_template;
  2. the dialogues split by prepared.split_indices: shuffled with the fixed SPLIT_SEED, the LAST
     max(1, round(n * data.eval_fraction)) of that order held out for eval (so eval mixes all sources), the
     rest train, each split in that order;
  3. an example whose loss_mask has no True left after the cut is dropped and counted (dropped_truncated);
  4. best-fit packing, per split, in that order: each example goes into the open row with the least room that
     still holds it whole (a new row if none does); no example is split across rows;
  5. rows of seq_len + 1 tokens written as .npy arrays: tokens (uint16, or uint32 for big vocabularies),
     segments (uint16: 1, 2, ... per example in the row, 0 padding) and mask (uint8: render's loss_mask).
The directory appears atomically and is reused when the fingerprint (sources, data_dir, eval_fraction,
seq_len, chat template, tokenizer sha256, FORMAT) matches.

A row of W = seq_len + 1 tokens becomes inputs = row[:-1], targets = row[1:]; segment_ids and positions
(restarting at 0 per example, 0 on padding) describe the inputs; weights = mask[1:] where the target is in the
same (non-padding) segment as its input, so the first token of the next example is never a target.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from llm_jax.config import Config, data_dir
from llm_jax.data.batches import TokenBatch, positions_from_segments
from llm_jax.data.chat.dialogue import DialogueStats, Message, iter_dialogues
from llm_jax.data.chat.prepared import publish_chat_data, split_indices
from llm_jax.data.chat.template import render
from llm_jax.data.shards import NpyRows, PreparedArrays, token_dtype
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import DataError

FORMAT = 1  # bump when the layout, the split or the packing changes: old directories then stop matching

Example = tuple[np.ndarray, np.ndarray]  # (ids, loss_mask) of one rendered dialogue


# --- packing ---------------------------------------------------------------------------------------------

def pack(lengths: Iterable[int], capacity: int) -> list[list[int]]:
    """Best-fit packing: rows (lists of example indices, in placement order) of at most capacity tokens.

    Each example goes into the open row with the least room left that still fits it, else into a new row;
    ties go to the most recently touched row. Deterministic for a given order of lengths.
    """
    rows: list[list[int]] = []
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]  # room left -> open rows with that room
    has_room = np.zeros(capacity + 1, bool)
    for i, n in enumerate(lengths):
        if not 0 < n <= capacity:
            raise ValueError(f"example {i} has {n} tokens; rows hold 1 to {capacity}")
        room = n + int(has_room[n:].argmax())
        if has_room[room]:
            row = by_room[room].pop()
            has_room[room] = bool(by_room[room])
        else:
            row, room = len(rows), capacity
            rows.append([])
        rows[row].append(i)
        if room - n:
            by_room[room - n].append(row)
            has_room[room - n] = True
    return rows


def row_arrays(examples: list[Example], capacity: int, pad_id: int, dtype) -> dict[str, np.ndarray]:
    """One packed row (tokens, segments, mask) of the examples, in order, padded to capacity."""
    row = {"tokens": np.full(capacity, pad_id, dtype), "segments": np.zeros(capacity, np.uint16),
           "mask": np.zeros(capacity, np.uint8)}
    start = 0
    for segment, (ids, mask) in enumerate(examples, 1):
        end = start + len(ids)
        row["tokens"][start:end], row["segments"][start:end], row["mask"][start:end] = ids, segment, mask
        start = end
    if start > capacity:
        raise ValueError(f"examples of {start} tokens do not fit a row of {capacity}")
    return row


def row_batch(tokens_W: np.ndarray, segments_W: np.ndarray, mask_W: np.ndarray,
              byte_lengths_V: np.ndarray) -> TokenBatch:
    """The TokenBatch row of one packed row of W = seq_len + 1 tokens."""
    tokens_W, segments_W = tokens_W.astype(np.int32), segments_W.astype(np.int32)
    inputs_T, targets_T, segment_ids_T = tokens_W[:-1], tokens_W[1:], segments_W[:-1]
    same_T = (segments_W[1:] == segment_ids_T) & (segment_ids_T > 0)  # target in the input's example
    return TokenBatch(inputs=inputs_T, targets=targets_T, segment_ids=segment_ids_T,
                      positions=positions_from_segments(segment_ids_T),
                      weights=(same_T & (mask_W[1:] > 0)).astype(np.float32),
                      target_bytes=byte_lengths_V[targets_T].astype(np.int32))


class PackedRows(NpyRows):
    """Packed SFT rows as TokenBatch rows of shape (seq_len,)."""

    def __init__(self, paths: dict[str, Path], byte_lengths_V: np.ndarray):
        super().__init__(paths)
        self.byte_lengths_V = byte_lengths_V

    def row(self, a: dict[str, np.ndarray], index: int) -> TokenBatch:
        return row_batch(a["tokens"][index], a["segments"][index], a["mask"][index], self.byte_lengths_V)


# --- preparation -----------------------------------------------------------------------------------------

class PreparedSFT(PreparedArrays):
    """Packed dialogue rows (train and eval splits)."""
    KIND = "packed dialogues"
    ARRAYS = ("tokens", "segments", "mask")

    def row_source(self, paths: dict[str, Path]) -> PackedRows:
        return PackedRows(paths, self.tokenizer.byte_lengths())


def prepare_sft(cfg: Config, out_dir: str | Path, tokenizer: Tokenizer | str | Path) -> None:
    """Renders and packs cfg's dialogues into out_dir, unless an identical config left them there
    (PreparedSFT.load reads them)."""
    out_dir = Path(out_dir)

    def describe(meta: dict) -> str:
        s = meta["splits"]
        return (f"prepared SFT {out_dir}: {meta['dialogues']} dialogues ({sum(meta['skipped'].values())} skipped, "
                f"{s['train']['dropped_truncated'] + s['eval']['dropped_truncated']} dropped by truncation), "
                f"{s['train']['rows']} train + {s['eval']['rows']} eval rows of {cfg.data.seq_len + 1}, "
                f"{s['train']['assistant_tokens']} train assistant tokens, "
                f"packing {s['train']['packing_efficiency']:.1%}")
    publish_chat_data(cfg, out_dir, tokenizer, FORMAT, _prepare_into, PreparedSFT, describe)


def _prepare_into(cfg: Config, tmp: Path, tokenizer: Tokenizer) -> dict:
    stats = DialogueStats()
    examples = [_render(d, tokenizer, cfg.data.seq_len + 1, cfg.data.chat_template)
                for d in iter_dialogues(cfg.data.sources, data_dir(cfg), stats)]
    if not examples:
        raise DataError(f"data.sources={list(cfg.data.sources)} yielded no trainable dialogue "
                        f"(skipped: {dict(stats.skipped)})")
    dtype = token_dtype(tokenizer.vocab_size)
    splits = {split: _write_split([examples[i] for i in idx], tmp, split, cfg.data.seq_len + 1,
                                  tokenizer.pad_id, dtype)
              for split, idx in split_indices(len(examples), cfg.data.eval_fraction).items()}
    return {"tokenizer_sha256": tokenizer.sha256, "seq_len": cfg.data.seq_len, "dtype": dtype.name,
            "dialogues": stats.n_yielded, "skipped": dict(stats.skipped), "splits": splits}


def _render(dialogue: list[Message], tokenizer: Tokenizer, max_len: int, template: str) -> Example | None:
    ids, mask = render(dialogue, tokenizer, max_len=max_len, template=template)
    return (ids, mask) if mask.any() else None  # all assistant tokens cut away: nothing to learn


def _write_split(examples: list[Example | None], out: Path, split: str, capacity: int, pad_id: int,
                 dtype) -> dict:
    kept = [e for e in examples if e is not None]
    rows = pack([len(ids) for ids, _ in kept], capacity)
    arrays = {k: np.lib.format.open_memmap(out / f"{split}-{k}.npy", "w+", t, (len(rows), capacity))
              for k, t in zip(PreparedSFT.ARRAYS, (dtype, np.uint16, np.uint8))}
    for r, row in enumerate(rows):
        for k, v in row_arrays([kept[i] for i in row], capacity, pad_id, dtype).items():
            arrays[k][r] = v
    for a in arrays.values():
        a.flush()
    real = sum(len(ids) for ids, _ in kept)
    return {"dialogues": len(examples), "dropped_truncated": len(examples) - len(kept), "examples": len(kept),
            "truncated": sum(len(ids) == capacity for ids, _ in kept), "rows": len(rows), "tokens": real,
            "assistant_tokens": int(sum(mask.sum() for _, mask in kept)),
            "packing_efficiency": real / max(1, len(rows) * capacity)}
