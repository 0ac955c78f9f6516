"""`llm-jax bench memory`: the largest global batch whose train step XLA plans to fit in a device's memory.

The step is compiled for abstract arrays (nothing allocated, nothing run) at the configured batch, doubled or
halved until the answer changes, then bisected.
"""
from __future__ import annotations

import os

import jax
import numpy as np

from llm_jax.bench.train import bench_setup, format_bytes, step_memory, synthetic_batch
from llm_jax.config import Config
from llm_jax.parallel import sharding
from llm_jax.train import step


def bench_memory(cfg: Config, limit_gib: float | None = None, max_compiles: int = 8) -> dict:
    """The largest global batch (a multiple of what the mesh and microbatches allow) whose step XLA plans
    within `limit_gib` per device (default: the device's memory limit, or on CPU the host memory shared by
    the local devices). Returns the plans compiled, {batch: bytes per device}, and the answer."""
    bench = bench_setup(cfg, abstract=True)
    M = cfg.train.microbatches
    granule = M * int(np.lcm(sharding.batch_split(bench.mesh), jax.process_count()))
    limit = limit_gib * 2**30 if limit_gib else _device_memory_limit()
    shardings = step.batch_shardings(bench.mesh, bench.task, microbatched=True)
    # One synthetic row per microbatch gives every entry's dtype and trailing shape.
    template = synthetic_batch(bench.task, M)
    plans = {}

    def fits(batch: int) -> bool:
        example = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct((M, batch // M, *x.shape[2:]), x.dtype, sharding=s),
                               template, shardings)
        plan = bench.train_fn.lower(bench.state, example, bench.frozen).compile().memory_analysis()
        plans[batch] = step_memory(plan)["total"]
        return plans[batch] <= limit

    good, bad = _search(fits, max(granule, cfg.train.batch_size // granule * granule), granule,
                        lambda: len(plans) < max_compiles)
    return {"plans": dict(sorted(plans.items())), "largest": good, "smallest_too_big": bad, "limit": limit,
            "granule": granule}


def _search(fits, batch: int, granule: int, may_compile) -> tuple[int | None, int | None]:
    """(largest batch found to fit, smallest found not to), multiples of `granule`, starting at `batch`, while
    `may_compile()`."""
    good, bad = (batch, None) if fits(batch) else (None, batch)
    while good is not None and bad is None and may_compile():  # double while it fits
        if fits(good * 2):
            good *= 2
        else:
            bad = good * 2
    while good is None and bad > granule and may_compile():  # halve until it fits
        half = max(granule, bad // 2 // granule * granule)
        if fits(half):
            good = half
        else:
            bad = half
    while good and bad and bad - good > granule and may_compile():
        mid = (good + bad) // 2 // granule * granule
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good, bad


def _device_memory_limit() -> float:
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return float(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / jax.local_device_count()


def format_memory(r: dict) -> str:
    lines = [f"{'global batch':>12}  {'step memory per device (XLA plan)':>34}"]
    lines += [f"{b:>12}  {format_bytes(v):>34}{'' if v <= r['limit'] else '  (does not fit)'}"
              for b, v in r["plans"].items()]
    if r["largest"] is None:
        lines.append(f"no batch (multiple of {r['granule']}) fits in {format_bytes(r['limit'])} per device")
    else:
        exact = r["smallest_too_big"] is not None and r["smallest_too_big"] - r["largest"] <= r["granule"]
        lines.append(f"largest batch that fits: {r['largest']} ({format_bytes(r['plans'][r['largest']])} of "
                     f"{format_bytes(r['limit'])} per device)"
                     f"{'' if exact else ' (search stopped before the exact limit)'}")
    return "\n".join(lines)


def run(cfg: Config, limit_gib: float | None = None) -> str:
    """What `llm-jax bench memory` prints."""
    return (f"bench memory {cfg.name} (seq {cfg.data.seq_len}, {cfg.train.microbatches} microbatches)\n"
            f"{format_memory(bench_memory(cfg, limit_gib))}")
