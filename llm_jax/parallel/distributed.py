"""Multi-process (multi-host) start-up, in one place: `initialize()` before anything touches a device.

Which processes form the job, in order of precedence:
  1. explicit: `--coordinator HOST:PORT --num-processes N --process-id I` (or LLM_JAX_COORDINATOR,
     LLM_JAX_NUM_PROCESSES, LLM_JAX_PROCESS_ID), as `launch/local-multiprocess` passes them;
  2. a cluster JAX detects by itself: a SLURM step of more than one task, or LLM_JAX_DISTRIBUTED=1 (set by
     `launch/tpu`: every worker of a TPU pod slice finds the others through the TPU metadata);
  3. otherwise one process, and nothing to do.
With several processes on CPU the collectives go through gloo. Once initialised, every process sees all
devices of the job; the training loop writes logs, TensorBoard and files from process 0 only, and each
process reads only its own rows of every batch (data/pipeline.py); `is_main()` and `barrier()` are
what the rest of the code asks of the job.
"""
from __future__ import annotations

import os

import jax

from llm_jax.errors import ConfigError


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Joins the job's other processes if there are any; returns whether it did."""
    coordinator = coordinator or os.environ.get("LLM_JAX_COORDINATOR")
    if coordinator:
        num_processes = _int("num-processes", num_processes, "LLM_JAX_NUM_PROCESSES")
        process_id = _int("process-id", process_id, "LLM_JAX_PROCESS_ID")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id={process_id} is not in 0..{num_processes - 1} (--num-processes)")
        if num_processes == 1:
            return False
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return True
    if os.environ.get("LLM_JAX_DISTRIBUTED") == "1" or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()  # JAX reads the SLURM variables or the TPU metadata itself
        return True
    return False


def _int(flag: str, value: int | None, env: str) -> int:
    if value is None:
        text = os.environ.get(env)
        if text is None:
            raise ConfigError(f"--coordinator needs --{flag} (or {env})")
        try:
            value = int(text)
        except ValueError:
            raise ConfigError(f"{env}={text!r} is not an integer") from None
    return value


def is_main() -> bool:
    """Process 0 writes logs, TensorBoard and files; the others compute."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process of the job gets here."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
