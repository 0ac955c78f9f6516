"""Continuous batching: one thread decodes a fixed batch of slots; requests join and leave at any step.

The KV cache holds `max_batch` rows of `max_context` tokens, each row with its own cache index (see
model/attention.py), position and sampling settings. A new job is prefilled alone (its prompt right-padded to a
power-of-two width, so a few widths cover every length) into a one-row cache that then replaces its slot's row;
from the next step on it decodes beside the others. Every decode step runs all slots, busy or not, so a row's
computation has the same shapes whatever the other rows are doing: greedy output is the same alone or in a full
batch, and a seeded job draws the same tokens (its key is fold_in(seed, stream, step), never a neighbour's).

Jobs talk to the engine through callbacks run on the engine thread (`on_event(token, finish)`), so the engine
knows nothing of HTTP; `cancel()` frees a slot at the next step (a client that went away).
"""
from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.data.batches import positions_from_segments
from llm_jax.errors import ConfigError
from llm_jax.inference.generate import sample_rows
from llm_jax.inference.runner import ModelRunner

MIN_PREFILL = 16  # the narrowest prefill: shorter prompts share one compilation


@dataclasses.dataclass(eq=False)
class Job:
    """One sequence to generate. on_event(token, None) for each new token; on_event(None, reason) once at the end,
    reason "stop" (a stop token), "length" (max_tokens), "cancelled" or "error: ..."."""
    prompt: list[int]
    max_tokens: int
    on_event: Callable[[int | None, str | None], None]
    stop_ids: frozenset[int] = frozenset()
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stream: int = 0  # the n-th choice of a request: same seed, its own random stream
    cancelled: bool = False
    generated: int = 0


class Engine:
    def __init__(self, runner: ModelRunner, max_batch: int, max_context: int):
        runner.check_length(max_context, "--max-context")
        if max_context < 2:
            raise ConfigError(f"--max-context={max_context}: needs room for a prompt token and an answer token")
        self.runner, self.context = runner, max_context
        self.batch = runner.round_rows(max_batch)
        self.prefill_rows = runner.round_rows(1)  # a batch is split over devices in whole rows
        self.slots: list[Job | None] = [None] * self.batch
        self.pending: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._admitting: Job | None = None  # popped from pending, not yet in a slot: failed with the step if it fails
        self.ended = collections.Counter()  # jobs by how they ended (stop, length, cancelled), for /health
        self._cache = runner.empty_cache(self.batch, max_context)
        B = self.batch
        self._host = dict(token=np.zeros(B, np.int32), position=np.zeros(B, np.int32), seed=np.zeros(B, np.uint32),
                          stream=np.zeros(B, np.int32), count=np.zeros(B, np.int32),
                          temperature=np.zeros(B, np.float32), top_k=np.zeros(B, np.int32),
                          top_p=np.ones(B, np.float32))
        self._batch_axis = _batch_axes(runner, self.batch, max_context)
        self.model = runner.model(decode=True)
        self._prefill = runner.jit(self._prefill_fn)
        self._step = runner.jit(self._step_fn, donate_argnums=(1,))
        self._insert = runner.jit(self._insert_fn, donate_argnums=(0,))
        self._thread = threading.Thread(target=self._loop, name="llm-jax-engine", daemon=True)

    # --- jitted pieces -------------------------------------------------------------------------------------
    def _sample(self, logits_BxV, seed_B, stream_B, count_B, temperature_B, top_k_B, top_p_B):
        keys_B = jax.vmap(lambda s, n, c: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), n), c))(
            seed_B, stream_B, count_B)
        return sample_rows(logits_BxV.astype(jnp.float32), keys_B, temperature_B, top_k_B, top_p_B)

    def _prefill_fn(self, params, cache, tokens, positions, segments, length_R, settings):
        logits, updated = self.model.apply({"params": params, "cache": cache}, tokens, positions, segments,
                                           mutable=["cache"])
        last_RxV = jnp.take_along_axis(logits, (length_R - 1)[:, None, None], axis=1)[:, 0]
        # The prompt was right-padded: decoding goes on from its true end, over the pads' cache entries.
        cache = jax.tree_util.tree_map_with_path(
            lambda path, leaf: jnp.broadcast_to(length_R, leaf.shape[:-1] + length_R.shape).astype(leaf.dtype)
            if _is_index(path) else leaf, updated["cache"])
        return self._sample(last_RxV, *settings), cache

    def _step_fn(self, params, cache, token_B, position_B, settings):
        logits, updated = self.model.apply({"params": params, "cache": cache}, token_B[:, None],
                                           position_B[:, None], jnp.ones_like(token_B)[:, None], mutable=["cache"])
        return self._sample(logits[:, -1], *settings), updated["cache"]

    def _insert_fn(self, cache, row_cache, slot):
        return jax.tree.map(lambda big, row, axis: jax.lax.dynamic_update_slice_in_dim(
            big, jax.lax.slice_in_dim(row, 0, 1, axis=axis).astype(big.dtype), slot, axis),
            cache, row_cache, self._batch_axis)

    # --- the host side -------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self._wake:
            self.pending.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        """Frees the job's slot (or drops it from the queue) at the next step; its last event is "cancelled"."""
        job.cancelled = True
        with self._wake:
            self._wake.notify()

    def load(self) -> tuple[int, int]:
        """(rows decoding, jobs waiting for a slot)."""
        return sum(job is not None for job in self.slots), len(self.pending)

    def warm_up(self) -> None:
        """Compiles the decode step and every prefill width, so that no request waits for a compilation; a width
        that fails (out of memory at a long --max-context) is a ConfigError here, not a 500 on every request."""
        widths = [w for w in (MIN_PREFILL << i for i in range(32)) if w < self.context] + [self.context]
        left, ends = threading.Semaphore(0), []

        def done(token, finish):
            if finish:
                ends.append(finish)
                left.release()
        for width in widths:
            P = min(width, self.context - 1)
            self.submit(Job([0] * P, min(2, self.context - P), done))
        for _ in widths:
            left.acquire()
        failed = [e for e in ends if e.startswith("error")]
        if failed:
            raise ConfigError(f"--max-context {self.context}: warming up the engine failed ({failed[0][7:]})")

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self.pending and not any(self.slots) and not self._admitting:
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self._admit()
                if any(self.slots):
                    self._decode()
            except Exception as e:  # a failed step fails its jobs (the one being admitted too), not the server
                with self._wake:
                    jobs, self.pending = [*self.slots, self._admitting, *self.pending], collections.deque()
                self.slots, self._admitting = [None] * self.batch, None
                for job in jobs:
                    if job is not None:
                        self._end(job, f"error: {type(e).__name__}: {e}")
                self._cache = self.runner.empty_cache(self.batch, self.context)
        for job in [*self.slots, *self.pending]:
            if job is not None:
                self._end(job, "cancelled")

    def _admit(self) -> None:
        while None in self.slots:
            with self._wake:
                if not self.pending:
                    return
                job = self._admitting = self.pending.popleft()
            if job.cancelled:
                self._admitting = None
                self._end(job, "cancelled")
                continue
            slot = self.slots.index(None)
            token = self._prefill_job(job, slot)
            self.slots[slot], self._admitting = job, None
            self._emit(slot, token)

    def _prefill_job(self, job: Job, slot: int) -> int:
        P = len(job.prompt)
        width = min(max(MIN_PREFILL, 1 << (P - 1).bit_length()), self.context)
        tokens = np.zeros((self.prefill_rows, width), np.int32)
        segments = np.zeros_like(tokens)
        tokens[:, :P], segments[:, :P] = job.prompt, 1
        h = self._host
        for name, value in (("seed", job.seed), ("stream", job.stream), ("count", 0), ("temperature", job.temperature),
                            ("top_k", job.top_k), ("top_p", job.top_p)):
            h[name][slot] = value
        settings = tuple(np.repeat(h[name][slot:slot + 1], self.prefill_rows) for name in _SETTINGS)
        token, row_cache = self._prefill(self.runner.params, self.runner.empty_cache(self.prefill_rows, self.context),
                                         tokens, positions_from_segments(segments),
                                         segments, np.full(self.prefill_rows, P, np.int32), settings)
        self._cache = self._insert(self._cache, row_cache, np.int32(slot))
        h["position"][slot] = P
        return int(np.asarray(token)[0])

    def _decode(self) -> None:
        h = self._host
        # Copies: on CPU, jit may read a numpy argument in place after returning, while these arrays change.
        settings = tuple(h[name].copy() for name in _SETTINGS)
        token, self._cache = self._step(self.runner.params, self._cache, h["token"].copy(), h["position"].copy(),
                                        settings)
        h["position"] += 1
        for slot, tok in enumerate(np.asarray(token).tolist()):
            if self.slots[slot] is not None:
                self._emit(slot, tok)

    def _emit(self, slot: int, token: int) -> None:
        """Hands a slot's new token to its job, and frees the slot when the job is over."""
        job, h = self.slots[slot], self._host
        if job.cancelled:
            finish = "cancelled"
        else:
            job.generated += 1
            self._tell(job, token, None)
            finish = ("stop" if token in job.stop_ids else "length" if job.generated >= job.max_tokens
                      else "cancelled" if job.cancelled else None)
        h["token"][slot], h["count"][slot] = token, job.generated
        if finish:
            self._end(job, finish)
            self.slots[slot] = None
            # An idle row decodes greedily and asks for no filter: the cheapest (sample_rows skips the rest).
            h["temperature"][slot], h["top_k"][slot], h["top_p"][slot] = 0.0, 0, 1.0


    def _end(self, job: Job, finish: str) -> None:
        self.ended[finish.partition(":")[0]] += 1
        self._tell(job, None, finish)

    @staticmethod
    def _tell(job: Job, token: int | None, finish: str | None) -> None:
        try:
            job.on_event(token, finish)
        except Exception:  # a listener gone with its event loop (shutdown) must not end the engine thread
            job.cancelled = True


_SETTINGS = ("seed", "stream", "count", "temperature", "top_k", "top_p")


def _is_index(path) -> bool:
    return getattr(path[-1], "key", None) == "index"


def _batch_axes(runner: ModelRunner, batch: int, context: int):
    """For each cache leaf, the axis that holds the batch (1 under nn.scan's layer axis, else 0)."""
    def shapes(rows):
        return jax.tree.map(lambda x: x.shape, jax.eval_shape(lambda: runner.empty_cache(rows, context)))
    return jax.tree.map(lambda a, b: next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), 0),
                        shapes(batch + 1), shapes(batch + 2), is_leaf=lambda x: isinstance(x, tuple))
