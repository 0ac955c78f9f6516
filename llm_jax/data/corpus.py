"""Documents from data sources: each `kind:pattern` string of data.sources becomes a stream of texts.

Kinds (pattern: a glob relative to data_dir unless absolute, `**` recursive, `.gz` files gunzipped):
  python_stdlib             every *.py of the running Python's standard library, tests excluded; one per file
  text:GLOB                 one document per file
  gutenberg:GLOB            one per book, the Project Gutenberg header and license footer stripped
  jsonl:GLOB#FIELD          one per line, the text in FIELD
  chinese_poetry:GLOB       chinese-poetry JSON: one per poem/record (title, then its lines)
  squad:GLOB                SQuAD JSON: one per data[].paragraphs[].context
Files are read in sorted path order, sources in the order given, so the stream is deterministic.
"""
from __future__ import annotations

import functools
import glob
import gzip
import json
import os
import re
import sysconfig
import warnings
from pathlib import Path
from typing import Callable, Iterator

from llm_jax.errors import DataError

Reader = Callable[[Path], Iterator[str]]

_HINT = "set the data location with --set data.data_dir=... or $LLM_JAX_DATA"
_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG EBOOK.*$", re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG EBOOK", re.MULTILINE)
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages"}
_POEM_HEADINGS = ("title", "rhythmic", "chapter", "type")
_POEM_TEXTS = ("paragraphs", "para", "content")


def iter_documents(sources: tuple[str, ...], data_dir: Path, max_bytes: int = 0) -> Iterator[str]:
    """Yields the non-empty documents of all sources; max_bytes > 0 stops after that many UTF-8 bytes."""
    plans = [_resolve(source, Path(data_dir)) for source in sources]  # bad sources fail before any reading
    left, n_docs = max_bytes, 0
    for text in (text for reader, paths in plans for path in paths for text in reader(path)):
        if not text.strip():
            continue
        if max_bytes:
            raw = text.encode()
            if len(raw) >= left:  # cut the last document on a character boundary
                text = raw[:left].decode("utf-8", errors="ignore")
            left -= len(raw)
        n_docs += 1
        yield text
        if max_bytes and left <= 0:
            break
    if not n_docs:
        raise DataError(f"data.sources={list(sources)} hold no text (every document is empty)")


def _resolve(source: str, data_dir: Path) -> tuple[Reader, list[Path]]:
    kind, _, pattern = source.partition(":")
    if kind == "python_stdlib":
        if pattern:
            raise DataError(f"data.sources entry {source!r}: python_stdlib takes no pattern")
        return _whole_file, _stdlib_files()
    if kind == "jsonl":
        pattern, sep, field = pattern.rpartition("#")
        if not sep or not field:
            raise DataError(f"data.sources entry {source!r} must look like jsonl:GLOB#FIELD")
        return functools.partial(_jsonl_documents, field=field), glob_source(source, pattern, data_dir)
    if kind not in READERS:
        raise DataError(f"data.sources entry {source!r}: unknown kind {kind!r} (known: {', '.join(KINDS)})")
    return READERS[kind], glob_source(source, pattern, data_dir)


def glob_source(source: str, pattern: str, data_dir: Path) -> list[Path]:
    if not pattern:
        raise DataError(f"data.sources entry {source!r} needs a file pattern (kind:GLOB)")
    if os.path.isabs(pattern):
        matches = [Path(m) for m in glob.glob(pattern, recursive=True)]
    elif not data_dir.is_dir():
        raise DataError(f"data directory {data_dir} (for {source!r}) does not exist; {_HINT}")
    else:
        matches = [data_dir / m for m in glob.glob(pattern, root_dir=data_dir, recursive=True)]
    files = sorted(m for m in matches if m.is_file())
    if not files:
        raise DataError(f"data.sources entry {source!r}: {pattern!r} matches no file in {data_dir}; {_HINT}")
    return files


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not _STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1])
                   and not p.name.startswith("test_"))
    if not files:
        raise DataError(f"python_stdlib: no *.py files under {root}")
    return files


def read_text(path: Path) -> str:
    """The file's text (gunzipped if .gz); invalid UTF-8 is replaced by U+FFFD and counted in a warning."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a valid gzip file ({e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("utf-8-sig", errors="replace")
        # Each invalid sequence becomes one U+FFFD; those already in the file are not errors.
        n_bad = text.count("\ufffd") - raw.count("\ufffd".encode())
        warnings.warn(f"{path}: {n_bad} invalid UTF-8 sequence(s) replaced by U+FFFD", stacklevel=2)
        return text


def read_json(path: Path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


def _whole_file(path: Path) -> Iterator[str]:
    yield read_text(path)


def _gutenberg_book(path: Path) -> Iterator[str]:
    text = read_text(path).replace("\r\n", "\n")
    start = _GUTENBERG_START.search(text)
    end = _GUTENBERG_END.search(text, start.end()) if start else None
    if not end:
        which = "END" if start else "START"
        raise DataError(f"{path}: no '*** {which} OF THE PROJECT GUTENBERG EBOOK' line; not a Gutenberg book?")
    yield text[start.end():end.start()].strip("\n")


def jsonl_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, record) of each non-blank line of a JSONL file; a malformed line is a DataError at file:line."""
    # split("\n"), not splitlines(): JSON strings may hold a raw U+2028, which splitlines would cut.
    for lineno, line in enumerate(read_text(path).split("\n"), 1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None


def json_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) of a JSON list ("file: record i") or of JSONL ("file:line")."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        yield from ((f"{path}: record {i}", record) for i, record in enumerate(data))
    else:
        yield from ((f"{path}:{lineno}", record) for lineno, record in jsonl_records(path))


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    for lineno, record in jsonl_records(path):
        if not isinstance(record, dict) or field not in record:
            raise DataError(f"{path}:{lineno}: no field {field!r} in this record")
        if not isinstance(record[field], str):
            raise DataError(f"{path}:{lineno}: field {field!r} is {type(record[field]).__name__}, not a string")
        yield record[field]


def _poetry_documents(path: Path) -> Iterator[str]:
    data = read_json(path)
    for record in data if isinstance(data, list) else [data]:
        lines = _poem_lines(record)
        if lines:
            yield "\n".join(lines)


def _poem_lines(node) -> list[str]:
    """Lines of a chinese-poetry node: strings, lists, or objects whose text (possibly nested) has a heading."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [line for item in node for line in _poem_lines(item)]
    if not isinstance(node, dict):
        return []
    body = next((node[k] for k in _POEM_TEXTS if node.get(k)), None)
    if body is None:
        return []
    heading = next((node[k] for k in _POEM_HEADINGS if isinstance(node.get(k), str) and node[k]), None)
    return ([heading] if heading else []) + _poem_lines(body)


def _squad_contexts(path: Path) -> Iterator[str]:
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: not SQuAD JSON (expected an object with a 'data' list)")
    for article in data["data"]:
        for paragraph in article.get("paragraphs", []):
            if isinstance(paragraph.get("context"), str):
                yield paragraph["context"]


READERS: dict[str, Reader] = {  # the kinds whose pattern is a plain glob, each file read by its reader
    "text": _whole_file, "gutenberg": _gutenberg_book, "chinese_poetry": _poetry_documents, "squad": _squad_contexts}
KINDS = ("python_stdlib", "jsonl", *READERS)
