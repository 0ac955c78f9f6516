"""Preemption: SIGTERM/SIGINT become a request to checkpoint at the next step boundary and stop.

Clusters send SIGTERM some time before they kill a job; stopping at a step boundary bounds the delay by
one step plus one checkpoint save. The run then raises errors.Preempted, and the CLI exits with
PREEMPTED_EXIT (75) so a launcher can requeue it.
"""
from __future__ import annotations

import signal

import jax


class PreemptionWatch:
    """Turns SIGTERM/SIGINT into a request to checkpoint and stop at the next step boundary."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal_name = None
        self._previous = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        """Whether any process was signalled (all processes must agree, since saving is collective)."""
        local = self.signal_name is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils
        return bool(multihost_utils.process_allgather(jax.numpy.array(local)).any())
