"""Batches from any random-access source of rows (grain for training), and the packed windows of
pretraining's token shards.

Packing: the token stream is cut into windows of seq_len + 1 tokens with stride seq_len, so window i is
stream[i*T : i*T + T + 1], inputs = window[:-1], targets = window[1:]. Every target of the stream (all but
its first token) is in exactly one window, except the last < T tokens, which are dropped. Documents end in
EOS; inside a window, segment_ids start at 1 and grow after each EOS of inputs (an EOS belongs to the document
it ends), and positions restart at 0 with each segment and at the window start. Padding (only in the last
eval batch) is TokenBatch.padding: inputs = targets = pad_id, segment_ids 0, weights 0, target_bytes 0.

Per-process sharding: element e of the global stream of windows goes to process e % process_count, so the
local batches of all processes at one step make up exactly the global batch of one process.
"""
from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING

import grain
import numpy as np
from absl import flags

from llm_jax.data.batches import TokenBatch, positions_from_segments, split_microbatches, stack
from llm_jax.data.shards import TokenArray
from llm_jax.errors import DataError

if TYPE_CHECKING:  # prepare.py builds its rows from PackedWindows
    from llm_jax.data.prepare import Prepared


class PackedWindows:
    """Random-access source of packed windows: TokenBatch rows of shape (seq_len,)."""

    def __init__(self, tokens: TokenArray | np.ndarray, seq_len: int, byte_lengths_V: np.ndarray, eos_id: int):
        self.tokens, self.seq_len, self.byte_lengths_V, self.eos_id = tokens, seq_len, byte_lengths_V, eos_id

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> TokenBatch:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        T = self.seq_len
        window_W = np.asarray(self.tokens[index * T:index * T + T + 1], np.int32)
        inputs_T, targets_T = window_W[:-1], window_W[1:]
        starts_T = np.concatenate([[True], inputs_T[:-1] == self.eos_id])  # at the window start and after EOS
        segment_ids_T = np.cumsum(starts_T, dtype=np.int32)
        return TokenBatch(inputs=inputs_T, targets=targets_T, segment_ids=segment_ids_T,
                          positions=positions_from_segments(segment_ids_T), weights=np.ones(T, np.float32),
                          target_bytes=self.byte_lengths_V[targets_T].astype(np.int32))

    def __repr__(self) -> str:
        return f"PackedWindows(tokens={len(self.tokens)}, seq_len={self.seq_len})"


class DatasetSource:
    """A task's training batches from a data set (tasks/base.BatchSource): endless shuffled batches of any
    random-access source of rows, (microbatches, local_batch // microbatches, ...) per entry.

    Each epoch is a fresh permutation of the rows; the position (grain's iterator state) resumes exactly.
    """

    def __init__(self, rows, global_batch: int, microbatches: int, seed: int, process_index: int,
                 process_count: int, num_workers: int = 0):
        local_batch = _local_batch(global_batch, process_count)
        if local_batch % microbatches:
            raise DataError(f"train.batch_size={global_batch} over {process_count} processes gives {local_batch} "
                            f"sequences each, not divisible by train.microbatches={microbatches}")
        # grain reseeds epoch e with seed + e: hashing the seed keeps runs with seeds s and s+1 unrelated.
        shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
        ds = (grain.MapDataset.source(rows).shuffle(seed=shuffle_seed).repeat()
              [process_index::process_count]
              .batch(local_batch, drop_remainder=True)
              .map(functools.partial(split_microbatches, microbatches)))
        iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
        if num_workers > 0:
            # grain's worker start reads absl flags, which raise unless parsed; we are not run by absl.app.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
        self.iterator = iter(iter_ds)
        self.num_workers = num_workers

    def next_batch(self, state=None):
        return next(self.iterator)

    # The position as grain's checkpoint handler saves it (the same file a grain iterator would write).
    def get_state(self) -> bytes:
        return json.dumps(self.iterator.get_state(), indent=4).encode()

    def set_state(self, state: bytes) -> None:
        self.iterator.set_state(json.loads(state))

    def start_prefetch(self) -> None:
        self.iterator.start_prefetch()

    def scalars(self) -> dict[str, float]:
        return {}

    def restart_at(self, step: int) -> None:
        if self.num_workers:  # worker iterators keep interleaved per-worker states: no plain index
            raise DataError(f"the data position of checkpoint step {step} was saved by another number of processes, "
                            "and worker iterators cannot restart at a batch index: resume with data.num_workers=0")
        self.iterator.set_state({"next_index": step})

    def close(self) -> None:
        self.iterator.close()


def ordered_batches(source, global_batch: int, process_index: int, process_count: int, max_batches: int,
                    padding) -> list:
    """Rows of `source` in order, split across processes like training, the last batch filled with `padding`
    (a row of the same batch type that counts for nothing)."""
    local_batch = _local_batch(global_batch, process_count)
    n_batches = -(-len(source) // global_batch)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    batches = []
    for b in range(n_batches):
        indices = [b * global_batch + process_index + process_count * j for j in range(local_batch)]
        rows = [source[i] if i < len(source) else padding for i in indices]
        batches.append(stack(rows))
    return batches


def eval_text(prepared: Prepared, seq_len: int, n_windows: int) -> bytes:
    """The exact UTF-8 bytes of the targets of the first n_windows eval windows (all there are, if fewer)."""
    n_windows = min(n_windows, len(prepared.rows("eval", seq_len)))
    return prepared.tokenizer.decode_bytes(prepared.tokens("eval")[1:n_windows * seq_len + 1])


def _local_batch(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise DataError(f"train.batch_size={global_batch} is not divisible by the {process_count} processes")
    return global_batch // process_count
