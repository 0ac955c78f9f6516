"""The batch source of RL runs (tasks/base.BatchSource): a rollout, then minibatches of it, then the next.

Rollout r answers prompts r·P .. r·P + P - 1 of an endless stream of the train prompts (each pass a fresh
permutation, seeded by train.seed), sampled with a seed derived from (train.seed, r). Its N = P·k rows are
trained on for rl.epochs epochs, each a fresh permutation in minibatches of train.batch_size rows: one train
step each, so a rollout feeds epochs·N/batch_size steps, and `next_batch(state)` makes the next rollout from
state's params when the buffer is spent. The position (rollout index, minibatch, β of the KL controller) and
the buffer itself are the saved state, so a run resumed from any checkpoint, also one taken in the middle of
a buffer, continues exactly as it would have.
"""
from __future__ import annotations

import base64
import io
import json

import numpy as np

from llm_jax.data.batches import RolloutBatch, split_microbatches
from llm_jax.errors import DataError
from llm_jax.tasks import advantages as adv


def _seed(*parts: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(p) for p in parts])


class RolloutSource:
    def __init__(self, task, prompts: list):
        c = task.cfg
        self.task, self.prompts = task, prompts
        self.rows = c.rl.prompts_per_rollout * c.rl.samples_per_prompt
        self.minibatches = self.rows // c.train.batch_size
        self.steps_per_rollout = c.rl.epochs * self.minibatches
        self.rollout, self.position, self.kl_coef = 0, 0, c.rl.kl_coef
        self.buffer: RolloutBatch | None = None
        self._scalars: dict[str, float] = {}

    def rollout_prompts(self, rollout: int) -> list:
        n, P = len(self.prompts), self.task.cfg.rl.prompts_per_rollout
        out = []
        for i in range(rollout * P, (rollout + 1) * P):
            epoch, j = divmod(i, n)
            order = np.random.default_rng(_seed(self.task.cfg.train.seed, 0, epoch)).permutation(n)
            out.append(self.prompts[order[j]])
        return out

    def next_batch(self, state) -> RolloutBatch:
        c = self.task.cfg
        if self.buffer is None or self.position == self.steps_per_rollout:
            if self.buffer is not None:
                self.rollout, self.position = self.rollout + 1, 0
            policy, value = self.task.policy_and_value(state.params)
            sample_seed = int(_seed(c.train.seed, 1, self.rollout).generate_state(1)[0] >> 1)
            self.buffer, stats = self.task.engine(state.params).rollout(
                policy, value, self.rollout_prompts(self.rollout), sample_seed, self.kl_coef)
            if c.rl.kl_target > 0:  # the next rollout's β
                self.kl_coef = adv.adapt_kl_coef(self.kl_coef, stats["rl/kl"], c.rl.kl_target, self.rows,
                                                 c.rl.kl_horizon)
            self._scalars = stats
        epoch, minibatch = divmod(self.position, self.minibatches)
        order = np.random.default_rng(_seed(c.train.seed, 2, self.rollout, epoch)).permutation(self.rows)
        B = c.train.batch_size
        rows = order[minibatch * B:(minibatch + 1) * B]
        self.position += 1
        return split_microbatches(c.train.microbatches, RolloutBatch(*(x[rows] for x in self.buffer)))

    def scalars(self) -> dict[str, float]:
        out, self._scalars = self._scalars, {}
        return out

    def get_state(self) -> bytes:
        buffer = ""
        if self.buffer is not None:
            raw = io.BytesIO()
            np.savez(raw, *self.buffer)
            buffer = base64.b64encode(raw.getvalue()).decode("ascii")
        return json.dumps({"rollout": self.rollout, "position": self.position, "kl_coef": self.kl_coef,
                           "buffer": buffer}).encode()

    def set_state(self, state: bytes) -> None:
        saved = json.loads(state)
        self.rollout, self.position, self.kl_coef = saved["rollout"], saved["position"], saved["kl_coef"]
        self.buffer = None
        if saved["buffer"]:
            with np.load(io.BytesIO(base64.b64decode(saved["buffer"]))) as arrays:
                self.buffer = RolloutBatch(*(arrays[f"arr_{i}"] for i in range(len(RolloutBatch._fields))))

    def restart_at(self, step: int) -> None:
        raise DataError(f"the rollout buffer of checkpoint step {step} was saved by another number of processes; "
                        "RL runs resume on one process")

    def start_prefetch(self) -> None:
        pass

    def close(self) -> None:
        pass
