"""What the benchmark loaders share: finding their files, reading records with a file:line on every error,
drawing exemplars by seed, and ordering pooled groups so that a limit samples all of them."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator, Sequence

from llm_jax.data.corpus import jsonl_records
from llm_jax.errors import ConfigError, DataError
from llm_jax.evaluation.requests import Request


def existing(path: Path) -> Path:
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (the shared evaluation data, ../shared/data/eval_*)")
    return path


def files(folder: Path, pattern: str) -> list[Path]:
    """The files under `folder` matching `pattern`, in path order: the pooled order is the same everywhere."""
    found = sorted(existing(folder).rglob(pattern))
    if not found:
        raise DataError(f"{folder}: no {pattern} files")
    return found


def string_fields(path: Path, names: tuple[str, ...]) -> Iterator[tuple[str, tuple[str, ...]]]:
    """("file:line", values) of each record of a JSONL file, which must hold every field of `names` as a string."""
    for lineno, record in jsonl_records(existing(path)):
        where = f"{path}:{lineno}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: not a JSON object")
        for name in names:
            if not isinstance(record.get(name), str):
                raise DataError(f"{where}: field {name!r} missing or not a string")
        yield where, tuple(record[name] for name in names)


def check_shots(name: str, shots: int, pool: int, what: str) -> None:
    if shots > pool:
        raise ConfigError(f"{name}: {shots} shots asked, but {what} holds only {pool} exemplars")


def draw(pool: Sequence[str], shots: int, seed: int, index: int) -> tuple[str, ...]:
    """The exemplars of scored item `index`: a sample of the pool of its own, as the harness samples one per
    document, but seeded by (seed, index) rather than by a stream shared by all items, so that an item's prompt
    does not depend on which items came before it (a limit, an order) and is the same for every model."""
    if not shots:
        return ()
    return tuple(random.Random(f"{seed}:{index}").sample(pool, shots))


def interleave(groups: list[list[Request]]) -> list[Request]:
    """The groups' items round-robin (the first item of each group, then the second, ...): the first N of a
    pooled benchmark (a limit) then cover every paradigm or subject rather than the first few."""
    longest = max(map(len, groups), default=0)
    return [group[i] for i in range(longest) for group in groups if i < len(group)]
