"""Every error llm_jax reports to a user, and the exit status each one ends a command with.

The `UserError`s are input a researcher can fix (a config key, a mesh, a data file, a run directory, a
checkpoint, a launcher option, a Hugging Face directory): `llm-jax` prints their message, which is one line
naming the key, file or line at fault, and exits with USAGE_EXIT before anything is half-written. This
module imports nothing heavy, so that the CLI can report them without paying for JAX's import.
"""
from __future__ import annotations

USAGE_EXIT = 2  # bad input, reported in one line
NONFINITE_EXIT = 3  # a non-finite loss, gradient or update under train.nonfinite=stop
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request after checkpointing; run the same command to go on


class UserError(ValueError):
    """Input a user can fix; the message is one line naming what is at fault."""


class ConfigError(UserError):
    """A bad experiment file, override or field value."""


class DataError(UserError):
    """A bad source, file or record."""


class MeshError(UserError):
    """A mesh that does not fit the devices, or a dimension the mesh cannot split."""


class RunDirError(UserError):
    """A run directory that cannot be used as asked."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used for this run; the message names what differs."""


class LaunchError(UserError):
    """Bad launcher input."""


class HFError(UserError):
    """A Hugging Face directory or llm_jax model that cannot be converted."""


class NonFiniteError(RuntimeError):
    """A non-finite loss, gradient or update under train.nonfinite=stop."""


class Preempted(Exception):
    """SIGTERM/SIGINT stopped the run after it saved a checkpoint."""

    def __init__(self, step: int, signal_name: str):
        super().__init__(f"preempted by {signal_name} at step {step}: checkpoint saved; run the same command "
                         "again to continue")
