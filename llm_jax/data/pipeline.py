"""Packed training and evaluation batches from prepared token shards (grain for training).

Packing: the token stream is cut into windows of seq_len + 1 tokens with stride seq_len, so window i is
stream[i*T : i*T + T + 1], inputs = window[:-1], targets = window[1:]. Every target of the stream (all but
its first token) is in exactly one window, except the last < T tokens, which are dropped. Documents end in
EOS; inside a window, segment_ids start at 1 and grow after each EOS of inputs (an EOS belongs to the document
it ends), and positions restart at 0 with each segment and at the window start. Padding (only in the last
eval batch) has inputs = targets = pad_id, segment_ids 0, positions 0, weights 0, target_bytes 0.

Per-process sharding: element e of the global stream of windows goes to process e % process_count, so the
local batches of all processes at one step make up exactly the global batch of one process.
"""
from __future__ import annotations

import functools

import grain
from absl import flags
import numpy as np

from llm_jax.data.corpus import DataError
from llm_jax.data.prepare import Prepared, TokenArray

KEYS = ("inputs", "targets", "segment_ids", "positions", "weights", "target_bytes")


class PackedWindows:
    """Random-access source of packed windows: dicts of int32/float32 arrays of shape (seq_len,)."""

    def __init__(self, tokens: TokenArray | np.ndarray, seq_len: int, byte_lengths_V: np.ndarray, eos_id: int):
        self.tokens, self.seq_len, self.byte_lengths_V, self.eos_id = tokens, seq_len, byte_lengths_V, eos_id

    def __len__(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.seq_len)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        T = self.seq_len
        window_W = np.asarray(self.tokens[index * T:index * T + T + 1], np.int32)
        inputs_T, targets_T = window_W[:-1], window_W[1:]
        ends_T = inputs_T == self.eos_id
        starts_T = np.concatenate([[True], ends_T[:-1]])  # a segment starts at the window and after each EOS
        index_T = np.arange(T, dtype=np.int32)
        return {"inputs": inputs_T, "targets": targets_T,
                "segment_ids": np.cumsum(starts_T, dtype=np.int32),
                "positions": index_T - np.maximum.accumulate(np.where(starts_T, index_T, 0)),
                "weights": np.ones(T, np.float32),
                "target_bytes": self.byte_lengths_V[targets_T].astype(np.int32)}

    def __repr__(self) -> str:
        return f"PackedWindows(tokens={len(self.tokens)}, seq_len={self.seq_len})"


def train_iterator(prepared: Prepared, seq_len: int, global_batch: int, microbatches: int, seed: int,
                   process_index: int, process_count: int, num_workers: int = 0) -> grain.DatasetIterator:
    """Endless shuffled batches of shape (microbatches, local_batch // microbatches, seq_len) per key.

    Each epoch is a fresh permutation of the windows; the iterator's get_state()/set_state() resume exactly.
    """
    source = _windows(prepared, prepared.train_tokens(), seq_len, "train")
    return batch_iterator(source, global_batch, microbatches, seed, process_index, process_count, num_workers)


def batch_iterator(source, global_batch: int, microbatches: int, seed: int, process_index: int,
                   process_count: int, num_workers: int = 0) -> grain.DatasetIterator:
    """Endless shuffled batches of any random-access source of rows (packed windows, packed dialogues)."""
    local_batch = _local_batch(global_batch, process_count)
    if local_batch % microbatches:
        raise DataError(f"train.batch_size={global_batch} over {process_count} processes gives {local_batch} "
                        f"sequences each, not divisible by train.microbatches={microbatches}")
    # grain reseeds epoch e with seed + e: hashing the seed keeps runs with seeds s and s+1 unrelated.
    shuffle_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    ds = (grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat()
          [process_index::process_count]
          .batch(local_batch, drop_remainder=True)
          .map(functools.partial(_split_microbatches, microbatches)))
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    if num_workers > 0:
        # grain's worker start reads absl flags, which raise unless parsed; we are not run by absl.app.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(iter_ds)


def eval_batches(prepared: Prepared, seq_len: int, global_batch: int, process_index: int, process_count: int,
                 max_batches: int = 0) -> list[dict[str, np.ndarray]]:
    """The eval windows in order, as this process's (local_batch, seq_len) arrays; max_batches=0: all."""
    source = _windows(prepared, prepared.eval_tokens(), seq_len, "eval")
    return ordered_batches(source, global_batch, process_index, process_count, max_batches,
                           padding_row(seq_len, prepared.tokenizer.pad_id))


def ordered_batches(source, global_batch: int, process_index: int, process_count: int, max_batches: int,
                    padding: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Rows of `source` in order, split across processes like training, the last batch filled with `padding`
    (a row with the same keys and shapes that counts for nothing: zero weights)."""
    local_batch = _local_batch(global_batch, process_count)
    n_batches = -(-len(source) // global_batch)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    batches = []
    for b in range(n_batches):
        indices = [b * global_batch + process_index + process_count * j for j in range(local_batch)]
        rows = [source[i] if i < len(source) else padding for i in indices]
        batches.append({k: np.stack([row[k] for row in rows]) for k in padding})
    return batches


def eval_text(prepared: Prepared, seq_len: int, n_windows: int) -> bytes:
    """The exact UTF-8 bytes of the targets of the first n_windows eval windows (all there are, if fewer)."""
    tokens = prepared.eval_tokens()
    n_windows = min(n_windows, len(_windows(prepared, tokens, seq_len, "eval")))
    return prepared.tokenizer.decode_bytes(tokens[1:n_windows * seq_len + 1])


def _local_batch(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise DataError(f"train.batch_size={global_batch} is not divisible by the {process_count} processes")
    return global_batch // process_count


def _windows(prepared: Prepared, tokens: TokenArray, seq_len: int, split: str) -> PackedWindows:
    windows = PackedWindows(tokens, seq_len, prepared.tokenizer.byte_lengths(), prepared.tokenizer.eos_id)
    if not len(windows):
        fix = "raise data.eval_fraction" if split == "eval" else "use more data or a smaller data.eval_fraction"
        raise DataError(f"the {split} split of {prepared.path} has {len(tokens)} tokens, fewer than one window "
                        f"of data.seq_len+1={seq_len + 1}; {fix} or lower data.seq_len")
    return windows


def padding_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """The row that fills a last, partial eval batch of next-token windows."""
    zeros_T = np.zeros(seq_len, np.int32)
    return {"inputs": zeros_T + pad_id, "targets": zeros_T + pad_id, "segment_ids": zeros_T,
            "positions": zeros_T, "weights": np.zeros(seq_len, np.float32), "target_bytes": zeros_T}


def _split_microbatches(microbatches: int, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.reshape(microbatches, -1, *v.shape[1:]) for k, v in batch.items()}
