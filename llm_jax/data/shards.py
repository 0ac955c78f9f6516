"""Prepared data on disk: directories published atomically and reused when their config fingerprint
matches, and memory-mapped arrays read from them (token shards, .npy rows) that grain workers can pickle.

Every task's `prepare` writes through `PreparedDir.publish`: files go to a temporary directory beside the
target, meta.json (with the fingerprint of the config fields that made it) is written last, and the directory
is renamed into place, so a crash leaves nothing half-written (the next publish removes what it left) and a
second process publishing the same data uses the first one's copy.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import operator
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import DataError


class TokenArray:
    """Read-only 1-D tokens over memory-mapped shards: len(a), a[i], a[i:j] (a copy only across shards).

    Pickles as file names, so grain worker processes map the files themselves.
    """

    def __init__(self, paths: list[Path], lengths: list[int], dtype: str):
        self._paths = list(paths)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._starts = np.cumsum([0, *lengths], dtype=np.int64)
        self._maps = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                raise IndexError("TokenArray slices take no step")
            return self._range(start, max(start, stop))
        i = operator.index(index)
        i += len(self) if i < 0 else 0
        if not 0 <= i < len(self):
            raise IndexError(f"token index {index} out of range for {len(self)} tokens")
        return self._range(i, i + 1)[0]

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self[:], dtype=dtype)

    def __getstate__(self):
        return {**self.__dict__, "_maps": None}

    def _range(self, start: int, stop: int) -> np.ndarray:
        if self._maps is None:
            self._maps = [np.memmap(p, self.dtype, mode="r") for p in self._paths]
        parts = []
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        while start < stop:
            end = min(stop, int(self._starts[k + 1]))
            parts.append(self._maps[k][start - self._starts[k]:end - self._starts[k]])
            start, k = end, k + 1
        if len(parts) == 1:
            return parts[0]
        return np.concatenate(parts) if parts else np.empty(0, self.dtype)


class NpyRows:
    """Random-access rows over .npy arrays of equal length (one per key), memory-mapped on first use.

    Subclasses turn row i of every array into batch entries (`row(arrays, i)`). Pickles as file names, so
    grain worker processes map the files themselves.
    """

    def __init__(self, paths: dict[str, Path]):
        self.paths, self._arrays = paths, None

    def arrays(self) -> dict[str, np.ndarray]:
        if self._arrays is None:
            self._arrays = {k: np.load(p, mmap_mode="r") for k, p in self.paths.items()}
        return self._arrays

    def __len__(self) -> int:
        return len(next(iter(self.arrays().values())))

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range for {len(self)} rows")
        return self.row(self.arrays(), index)

    def row(self, arrays: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({next(iter(self.paths.values())).parent}, rows={len(self)})"


SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class PreparedDir:
    """A directory of tokenized data: meta.json plus the tokenizer it was made with. KIND names what the
    subclass reads (token shards, packed dialogues, preference pairs); meta.json records what was written."""
    path: Path
    meta: dict
    tokenizer: Tokenizer
    KIND: ClassVar[str] = ""

    @classmethod
    def publish(cls, out_dir: Path, fields: dict, build: Callable[[Path], dict],
                describe: Callable[[dict], str]) -> None:
        """Makes out_dir hold this KIND of data made from `fields`, unless it already does: `build(tmp)` writes
        the files into a temporary directory beside it and returns the meta, meta.json is written last, and the
        directory is renamed into place. Prints describe(meta), or that the data was reused."""
        out_dir = Path(out_dir)
        fingerprint = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(out_dir)
        if matches_fingerprint(out_dir, fingerprint, fields):
            print(f"reusing prepared {cls.KIND} in {out_dir} (same data config)")
            return
        tmp = _temporary(out_dir)
        try:
            meta = {"fingerprint": fingerprint, "kind": cls.KIND, "config": fields, **build(tmp)}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
            if out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()
            try:
                os.rename(tmp, out_dir)
            except OSError:  # another process published the same data first: use theirs
                if not matches_fingerprint(out_dir, fingerprint, fields):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(describe(meta))

    @classmethod
    def load(cls, out_dir: str | Path):
        out_dir = Path(out_dir)
        if not (out_dir / "meta.json").is_file():
            raise DataError(f"{out_dir} holds no prepared data (no meta.json); prepare it first")
        meta = json.loads((out_dir / "meta.json").read_text())
        if meta.get("kind", cls.KIND) != cls.KIND:  # directories from before kinds were recorded pass
            raise DataError(f"{out_dir} holds {meta['kind']}, not the {cls.KIND} this task trains on; prepare "
                            "its data with this run's config (llm-jax prepare) or leave data.prepared unset")
        tokenizer = Tokenizer.load(out_dir / "tokenizer.model")
        if tokenizer.sha256 != meta["tokenizer_sha256"]:
            raise DataError(f"{out_dir}/tokenizer.model is not the tokenizer its meta.json was prepared with")
        prepared = cls(out_dir, meta, tokenizer)
        for path, size in prepared.expected_sizes():
            found = path.stat().st_size if path.is_file() else None
            if found is None or found != size:
                raise DataError(f"{path}: {'missing' if found is None else f'{found} bytes'}"
                                f"{'' if size is None else f', {size} expected'} (a damaged or partly copied data "
                                "directory); prepare it again")
        return prepared

    def expected_sizes(self) -> list[tuple[Path, int | None]]:
        """Every data file the meta describes, with the size that implies (None: unknown, the file is damaged
        or missing)."""
        raise NotImplementedError

    def rows(self, split: str, seq_len: int):
        """The random-access rows of a split (the batch rows of the task that trains on this KIND)."""
        raise NotImplementedError

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.model"


class PreparedArrays(PreparedDir):
    """Data rendered into fixed rows for one seq_len (SFT, preference pairs): per split, the .npy arrays
    `{split}-{name}.npy` of equal length, one per name in ARRAYS, read as rows by `row_source`."""
    ARRAYS: ClassVar[tuple[str, ...]] = ()

    def array_paths(self, split: str) -> dict[str, Path]:
        return {name: self.path / f"{split}-{name}.npy" for name in self.ARRAYS}

    def expected_sizes(self) -> list[tuple[Path, int | None]]:
        """Each array's size from its own .npy header."""
        sizes = []
        for path in (path for split in SPLITS for path in self.array_paths(split).values()):
            try:
                array = np.load(path, mmap_mode="r")
                sizes.append((path, array.offset + array.nbytes))
            except (FileNotFoundError, ValueError):  # ValueError: a file shorter than its header says
                sizes.append((path, None))
        return sizes

    def rows(self, split: str, seq_len: int) -> NpyRows:
        if seq_len != self.meta["seq_len"]:
            raise DataError(f"{self.path} was prepared for data.seq_len={self.meta['seq_len']}, not {seq_len}; "
                            "prepare it again for this seq_len")
        rows = self.row_source(self.array_paths(split))
        if not len(rows):
            raise DataError(f"the {split} split of {self.path} is empty; use more data or change "
                            "data.eval_fraction")
        return rows

    def row_source(self, paths: dict[str, Path]) -> NpyRows:
        """The rows over one split's arrays."""
        raise NotImplementedError


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned dtype that holds every id of the vocabulary (on disk)."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _temporary(out_dir: Path) -> Path:
    """A new directory beside out_dir, .NAME.tmp-HOST.PID.RANDOM: named for its writer, so that a later publish
    can tell what a killed process left from what a live one is writing."""
    return Path(tempfile.mkdtemp(prefix=f"{_host_prefix(out_dir)}{os.getpid()}.", dir=out_dir.parent))


def _host_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}.tmp-{socket.gethostname()}."


def _remove_stale_temporaries(out_dir: Path) -> None:
    """Removes what publishing out_dir left when killed half-way: the temporaries of this host's processes that
    are gone. Those of live ones (a concurrent job preparing the same shared data) are left alone."""
    prefix = _host_prefix(out_dir)
    for tmp in out_dir.parent.iterdir():
        pid = tmp.name[len(prefix):].partition(".")[0] if tmp.name.startswith(prefix) else ""
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def matches_fingerprint(out_dir: Path, fingerprint: str, fields: dict) -> bool:
    """True if out_dir holds data prepared with this fingerprint; False if it is absent or empty."""
    if not out_dir.exists() or (out_dir.is_dir() and not any(out_dir.iterdir())):
        return False
    meta_path = out_dir / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{out_dir} exists but holds no prepared data (no meta.json); pick another directory")
    meta = json.loads(meta_path.read_text())
    if meta.get("fingerprint") != fingerprint:
        old = meta.get("config", {})
        changed = sorted(k for k in {*old, *fields} if old.get(k) != fields.get(k))
        raise DataError(f"{out_dir} holds data prepared with a different config ({', '.join(changed)} differ); "
                        "pick another directory (data.prepared=...) or delete it")
    return True
