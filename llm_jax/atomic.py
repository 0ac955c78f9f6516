"""Files and directories written whole or not at all: results, configs, sweep definitions, event files,
compressed files, scores; exports and converted checkpoints."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes, temporary: Path | None = None) -> None:
    """Writes `data` (text as UTF-8) to `path` through a temporary file beside it (default PATH.partial),
    synced and then renamed over `path`: a crash leaves the old file or the new one, never a part of either
    (without the sync, a power loss after the rename could leave an empty file in place of the old one)."""
    path = Path(path)
    tmp = temporary or path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_directory(out: Path):
    """Yields an empty OUT.partial directory to write into, renamed to `out` when the block ends without an
    error: a stop half-way leaves no `out`, and the next attempt starts from an empty OUT.partial again."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    tmp.rename(out)
