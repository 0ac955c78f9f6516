"""PIQA: physical commonsense, two solutions per goal, English.

Format: lm-evaluation-harness `piqa` (harness commit 4e7e0d47f33b): the question `Question: {goal}\nAnswer:`,
the choices " " + sol1 and " " + sol2, scored by log-likelihood (acc, and acc_norm per byte of the choice).
Where we differ: the harness draws exemplars from PIQA's train split, which is not in the shared folder. Here
the LAST 100 lines of valid.jsonl (lines 1,739-1,838) are the exemplar pool and are never scored; the first
1,738 lines are scored, at every shot count. An exemplar is the question, " ", the correct solution and the
harness's few-shot delimiter "\n\n". Each scored item draws its own exemplars from the pool, seeded by
(seed, item index) (the harness also samples per item, from one seeded stream).
"""
from __future__ import annotations

from pathlib import Path

from llm_jax.data.corpus import read_text
from llm_jax.errors import DataError
from llm_jax.evaluation.benchmarks.common import check_shots, draw, existing, string_fields
from llm_jax.evaluation.requests import Request

POOL = 100  # the last lines of valid.jsonl, kept out of scoring as the exemplar pool
DESCRIBE = {"piqa": f"mc: valid lines 1-1,738 scored, exemplars drawn from the last {POOL} valid lines; "
                    "lm-evaluation-harness piqa format; English"}


def _labels(path: Path, count: int) -> list[int]:
    lines = [line.strip() for line in read_text(existing(path)).splitlines()]
    for lineno, line in enumerate(lines, 1):
        if line not in ("0", "1"):
            raise DataError(f"{path}:{lineno}: label {line!r}, not 0 or 1")
    if len(lines) != count:
        raise DataError(f"{path}: {len(lines)} labels for {count} records in valid.jsonl")
    return [int(line) for line in lines]


def build(name: str, folder: Path, shots: int, seed: int) -> list[Request]:
    records = [values for _, values in string_fields(folder / "valid.jsonl", ("goal", "sol1", "sol2"))]
    labels = _labels(folder / "valid-labels.lst", len(records))
    if len(records) <= POOL:
        raise DataError(f"{folder / 'valid.jsonl'}: {len(records)} records, fewer than the {POOL + 1} needed")
    check_shots(name, shots, POOL, "the exemplar pool (the last lines of valid.jsonl)")
    items = [(f"Question: {goal}\nAnswer:", (" " + sol1, " " + sol2), label)
             for (goal, sol1, sol2), label in zip(records, labels)]
    pool = [question + choices[label] + "\n\n" for question, choices, label in items[-POOL:]]
    return [Request("mc", draw(pool, shots, seed, i), question, choices, (label,))
            for i, (question, choices, label) in enumerate(items[:-POOL])]
