"""In-context benchmarks by name and shot count on one model: the table and JSON of `llm-jax eval-tasks`, and
the tasks/<name>/<k>shot/<metric> scalars of a training run's evaluations (train/loop.py).

Requests are made once per (benchmark, shots, seed, limit, data folder) in a process and reused: a training
run scores the same prompts at every evaluation, so its curve is one measurement over time.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path

from llm_jax.evaluation import benchmarks, icl
from llm_jax.evaluation.requests import Request

METRICS = ("acc", "acc_norm")  # the scalars a training run logs per benchmark and shot count


@functools.lru_cache(maxsize=64)
def requests(name: str, root: Path, shots: int, seed: int, limit: int) -> tuple[Request, ...]:
    return tuple(benchmarks.requests(name, root, shots, seed, limit or None))


def run(runner, tokenizer, names: tuple[str, ...], shots: tuple[int, ...], root: Path, *, context: int,
        limit: int = 0, seed: int = 1234, batch_size: int = 32, max_gen_tokens: int = 128,
        prompts_dir: Path | None = None) -> dict:
    """{name: {"<k>shot": metrics}} (metrics: acc, stderr, n, chance, ..., seconds) of every benchmark at every
    shot count; a zero-shot-only benchmark (minimal pairs) is scored at 0 shots only. With prompts_dir, the
    exact prompts and choices scored are written there, one JSONL file per benchmark and shot count."""
    results: dict = {}
    if prompts_dir is not None:
        Path(prompts_dir).mkdir(parents=True, exist_ok=True)
    for name in names:
        for k in sorted({0} if name in benchmarks.ZERO_SHOT_ONLY else set(shots)):
            reqs = list(requests(name, Path(root), k, seed, limit))
            if prompts_dir is not None:
                benchmarks.write_prompts(reqs, Path(prompts_dir) / f"{name}_{k}shot.jsonl")
            start = time.perf_counter()
            metrics = icl.score(runner, tokenizer, reqs, context, batch_size, max_gen_tokens).metrics()
            results.setdefault(name, {})[f"{k}shot"] = {**metrics, "seconds": time.perf_counter() - start}
    return results


def scalars(results: dict) -> dict[str, float]:
    """tasks/<name>/<k>shot/<metric> for each metric of METRICS a benchmark reports."""
    return {f"tasks/{name}/{shot}/{m}": float(r[m]) for name, by_shot in results.items()
            for shot, r in by_shot.items() for m in METRICS if m in r}


def format_table(results: dict) -> str:
    """One line per benchmark and shot count: accuracy ± its standard error, items, chance, seconds."""
    lines = [f"{'task':<15}{'shots':>6}{'acc':>9}{'± stderr':>10}{'acc_norm':>10}{'n':>8}{'chance':>9}{'seconds':>9}"]
    for name, by_shot in results.items():
        for shot, r in by_shot.items():
            norm = f"{r['acc_norm']:.4f}" if "acc_norm" in r else "-"
            lines.append(f"{name:<15}{shot.removesuffix('shot'):>6}{r['acc']:>9.4f}{r['stderr']:>10.4f}{norm:>10}"
                         f"{r['n']:>8}{r['chance']:>9.4f}{r['seconds']:>9.1f}")
            if r.get("truncated"):
                lines.append(f"{'':<21}{r['truncated']} of {r['n']} prompts had exemplars cut to fit the context")
            if r.get("skipped"):
                lines.append(f"{'':<21}{r['skipped']} items not scored: a choice is longer than the context")
    return "\n".join(lines)


def describe() -> str:
    """`--tasks list`: each benchmark's one-line description."""
    return "\n".join(f"{name:<15}{benchmarks.describe(name)}" for name in benchmarks.TASKS)
