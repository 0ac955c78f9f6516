"""The batches every task trains and evaluates on: entries, dtypes, logical axes and the padding row.

A batch is a NamedTuple of arrays (numpy on the host, jax on the devices), one class per kind of example.
Rows come first: (B, ...) for evaluation and (M, B/M, ...) for a training step of M microbatches. A data
pipeline builds one row at a time (an instance whose entries lack the leading axis); grain stacks them.
`axes()` gives each entry's logical axis names (mapped onto the mesh by parallel/sharding.py), `padding()`
the row that fills a last, partial evaluation batch and counts for nothing.

Positions are always derived from segment ids by `positions_from_segments`: a row may hold several documents
(packing), or padding (segment 0) on either side, and each real segment counts its positions from 0.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np


def positions_from_segments(segment_ids: np.ndarray) -> np.ndarray:
    """int32 position of every token within its run of equal segment ids (0 at each run's start), and 0 on
    padding (segment id 0); along the last axis, for any leading shape."""
    seg = np.asarray(segment_ids)
    index = np.broadcast_to(np.arange(seg.shape[-1], dtype=np.int32), seg.shape)
    starts = np.concatenate([np.ones_like(seg[..., :1], bool), seg[..., 1:] != seg[..., :-1]], axis=-1)
    positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    return np.where(seg > 0, positions, 0).astype(np.int32)


class TokenBatch(NamedTuple):
    """Rows of T tokens for next-token prediction: packed documents (pretraining) or dialogues (SFT).

    The model reads `inputs` and predicts `targets` (inputs shifted by one); `weights` say how much each
    target counts (0: not trained on, e.g. a user turn or padding) and `target_bytes` how many UTF-8 bytes
    it decodes to, which turns nats per token into bits per byte.
    """
    inputs: Any  # int32 (B, T)
    targets: Any  # int32 (B, T)
    segment_ids: Any  # int32 (B, T): 1, 2, ... per document in the row; 0 on padding
    positions: Any  # int32 (B, T): positions_from_segments(segment_ids)
    weights: Any  # float32 (B, T)
    target_bytes: Any  # int32 (B, T)

    @staticmethod
    def axes() -> "TokenBatch":
        return TokenBatch(*(("batch", "length"),) * 6)

    def shorter(self, pieces: int) -> "TokenBatch":
        """Each row (of the last axis) cut into `pieces` rows: the same tokens as shorter contexts (attention never
        crosses rows), for train.seq_len_warmup_steps. Positions are kept: RoPE only sees their differences."""
        return TokenBatch(*(a.reshape(*a.shape[:-2], a.shape[-2] * pieces, a.shape[-1] // pieces) for a in self))

    @staticmethod
    def padding(seq_len: int, pad_id: int) -> "TokenBatch":
        zeros_T = np.zeros(seq_len, np.int32)
        return TokenBatch(inputs=zeros_T + pad_id, targets=zeros_T + pad_id, segment_ids=zeros_T,
                          positions=zeros_T, weights=np.zeros(seq_len, np.float32), target_bytes=zeros_T)

    @staticmethod
    def synthetic(shape: tuple[int, ...], seq_len: int, vocab_size: int, rng: np.random.Generator) -> "TokenBatch":
        """Random tokens, one document per row (a step's cost does not depend on the token values)."""
        tokens = rng.integers(8, vocab_size, (*shape, seq_len + 1), dtype=np.int32)
        ones = np.ones((*shape, seq_len), np.int32)
        return TokenBatch(inputs=tokens[..., :-1], targets=tokens[..., 1:], segment_ids=ones,
                          positions=positions_from_segments(ones), weights=ones.astype(np.float32),
                          target_bytes=ones * 3)


def answer_rows(prompts: list[np.ndarray], answers: list[list[int]], width: int, pad_id: int,
                n_rows: int = 0) -> TokenBatch:
    """TokenBatch rows of prompt + answer, right-padded to `width` tokens (at least n_rows rows, the extra ones
    padding): inputs and next-token targets, weights 1 exactly on the targets that are answer tokens. What a
    policy's log-probabilities of its own answers are computed on (RL rollouts, `llm-jax compare`)."""
    N = max(len(answers), n_rows)
    inputs = np.full((N, width), pad_id, np.int32)
    targets, segments, weights = inputs.copy(), np.zeros_like(inputs), np.zeros((N, width), np.float32)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        ids = np.concatenate([prompt, np.asarray(answer, np.int32)])
        n = len(ids) - 1
        inputs[row, :n], targets[row, :n], segments[row, :n] = ids[:-1], ids[1:], 1
        weights[row, len(prompt) - 1:n] = 1.0
    return TokenBatch(inputs, targets, segments, positions_from_segments(segments), weights, np.zeros_like(inputs))


class PairBatch(NamedTuple):
    """Pairs of answers to one prompt for a reward model: row 0 of each (2, T) entry the chosen (preferred)
    sequence, row 1 the rejected one, both right-padded; `valid` is 0 only on padding pairs."""
    inputs: Any  # int32 (P, 2, T)
    positions: Any  # int32 (P, 2, T)
    segment_ids: Any  # int32 (P, 2, T): 1 on real tokens, 0 on padding
    margin: Any  # float32 (P,): how much chosen is preferred, when the data says (else 0)
    valid: Any  # float32 (P,)

    @staticmethod
    def axes() -> "PairBatch":
        sequences = ("batch", None, "length")
        return PairBatch(sequences, sequences, sequences, ("batch",), ("batch",))

    @staticmethod
    def padding(seq_len: int, pad_id: int) -> "PairBatch":
        zeros_2xT = np.zeros((2, seq_len), np.int32)
        return PairBatch(inputs=zeros_2xT + pad_id, positions=zeros_2xT, segment_ids=zeros_2xT,
                         margin=np.zeros((), np.float32), valid=np.zeros((), np.float32))

    @staticmethod
    def synthetic(shape: tuple[int, ...], seq_len: int, vocab_size: int, rng: np.random.Generator) -> "PairBatch":
        """Random answers filling every row."""
        ones = np.ones((*shape, 2, seq_len), np.int32)
        return PairBatch(inputs=rng.integers(8, vocab_size, ones.shape, dtype=np.int32),
                         positions=positions_from_segments(ones), segment_ids=ones,
                         margin=np.zeros(shape, np.float32), valid=np.ones(shape, np.float32))


class PairTokenBatch(NamedTuple):
    """Pairs of answers to one prompt for a policy's next-token log-probabilities (DPO): TokenBatch's entries
    with a pair axis, row 0 of each (2, T) entry the chosen sequence, row 1 the rejected one. `weights` are 1
    exactly on targets that are answer tokens (the prompt and padding count nothing); `valid` is 0 only on
    padding pairs."""
    inputs: Any  # int32 (P, 2, T)
    targets: Any  # int32 (P, 2, T)
    segment_ids: Any  # int32 (P, 2, T): 1 on real tokens, 0 on padding
    positions: Any  # int32 (P, 2, T)
    weights: Any  # float32 (P, 2, T)
    target_bytes: Any  # int32 (P, 2, T)
    valid: Any  # float32 (P,)

    @staticmethod
    def axes() -> "PairTokenBatch":
        sequences = ("batch", None, "length")
        return PairTokenBatch(*(sequences,) * 6, ("batch",))

    @staticmethod
    def padding(seq_len: int, pad_id: int) -> "PairTokenBatch":
        zeros_2xT = np.zeros((2, seq_len), np.int32)
        return PairTokenBatch(inputs=zeros_2xT + pad_id, targets=zeros_2xT + pad_id, segment_ids=zeros_2xT,
                              positions=zeros_2xT, weights=zeros_2xT.astype(np.float32), target_bytes=zeros_2xT,
                              valid=np.zeros((), np.float32))

    @staticmethod
    def synthetic(shape: tuple[int, ...], seq_len: int, vocab_size: int,
                  rng: np.random.Generator) -> "PairTokenBatch":
        """Random answers filling every row, the first quarter of each a prompt."""
        tokens = TokenBatch.synthetic((*shape, 2), seq_len, vocab_size, rng)
        weights = tokens.weights * (np.arange(seq_len) >= seq_len // 4)
        return PairTokenBatch(*tokens._replace(weights=weights), valid=np.ones(shape, np.float32))


class RolloutBatch(NamedTuple):
    """The policy's own answers for reinforcement learning (tasks/rl.py): prompt + answer rows, right-padded,
    with what the rollout recorded for every target. `weights` are 1 exactly on targets that are answer tokens
    (the sampled tokens, the end of turn included); every other entry counts only there."""
    inputs: Any  # int32 (B, T)
    targets: Any  # int32 (B, T)
    segment_ids: Any  # int32 (B, T): 1 on real tokens, 0 on padding
    positions: Any  # int32 (B, T)
    weights: Any  # float32 (B, T)
    old_logprobs: Any  # float32 (B, T): log π(target) of the policy that sampled it
    ref_logprobs: Any  # float32 (B, T): log ref(target)
    advantages: Any  # float32 (B, T)
    returns: Any  # float32 (B, T): the value model's targets (ppo)
    old_values: Any  # float32 (B, T): the value model's estimates at the rollout (ppo)
    kl_coef: Any  # float32 (B,): β at the rollout (the KL loss term's weight)

    @staticmethod
    def axes() -> "RolloutBatch":
        return RolloutBatch(*(("batch", "length"),) * 10, ("batch",))

    @staticmethod
    def padding(seq_len: int, pad_id: int) -> "RolloutBatch":
        tokens = TokenBatch.padding(seq_len, pad_id)
        zeros_T = np.zeros(seq_len, np.float32)
        return RolloutBatch(*tokens[:5], *(zeros_T,) * 5, kl_coef=np.zeros((), np.float32))

    @staticmethod
    def synthetic(shape: tuple[int, ...], seq_len: int, vocab_size: int, rng: np.random.Generator) -> "RolloutBatch":
        """Random answers after a prompt of a quarter of each row (a step's cost does not depend on the values)."""
        tokens = TokenBatch.synthetic(shape, seq_len, vocab_size, rng)
        weights = tokens.weights * (np.arange(seq_len) >= seq_len // 4)
        noise = lambda: rng.standard_normal((*shape, seq_len)).astype(np.float32)  # noqa: E731
        logprobs = -np.abs(noise()) - 1.0
        return RolloutBatch(*tokens[:4], weights, logprobs, logprobs, noise(), noise(), noise(),
                            kl_coef=np.full(shape, 0.05, np.float32))


def stack(rows: list) -> Any:
    """One batch of rows (instances of one batch class without the leading axis)."""
    return type(rows[0])(*(np.stack(entries) for entries in zip(*rows)))


def split_microbatches(microbatches: int, batch):
    """(B, ...) entries as (M, B/M, ...)."""
    return type(batch)(*(v.reshape(microbatches, -1, *v.shape[1:]) for v in batch))
