"""`llm-jax eval`: any model on any text, as compression: bits per token, bits per byte, tokens per byte, beside
gzip -9, bz2 -9 and xz -9e on the same bytes.

Each text is one document: its tokens follow an EOS (pretraining puts EOS between documents, so the first
token is predicted as the start of a document). A text longer than the model's context W (the checkpoint's
data.seq_len, or --context) is scored in overlapping windows of W tokens that start every S = --stride
tokens (default W / 2): the first window scores all its targets, every later one only its last S, each of
which has thus seen at least W - S tokens of context. Every target is scored exactly once. Bits per byte
divide the summed nats by the UTF-8 bytes of the scored tokens, which are exactly the text's bytes; through
a lossy tokenizer (WordPiece) they are the bytes its tokens stand for (tokenizer.scored_bytes), and the
compressors are given those same bytes. The compressors see each text separately too; their bits are summed
over texts. Primed (--prime FILE..., by default the training text of a run directory whose prepared data is
still there), each also reports the bits it adds for a text after the primer: a compressor that has read what
the model has read (evaluation/baselines.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np

from llm_jax.data.batches import TokenBatch, positions_from_segments
from llm_jax.data.corpus import jsonl_records, read_text
from llm_jax.errors import ConfigError, DataError
from llm_jax.evaluation import baselines
from llm_jax.inference.runner import ModelRunner
from llm_jax.tasks.losses import compression_rates, next_token_sums


@dataclass(frozen=True)
class Window:
    tokens: np.ndarray  # inputs then the last target: W + 1 ids at most
    first_scored: int  # index (into the targets) of the first target this window scores


def windows(ids: list[int], eos_id: int, context: int, stride: int) -> list[Window]:
    """Overlapping windows over [EOS] + ids that score every token of ids exactly once."""
    if not 0 < stride <= context:
        raise ConfigError(f"--stride={stride} must be between 1 and the context ({context})")
    stream = np.asarray([eos_id, *ids], np.int32)
    out, start, scored = [], 0, 0  # targets [0, scored) are done; target i is ids[i], predicted from stream[:i+1]
    while scored < len(ids):
        end = min(start + context, len(ids))
        out.append(Window(stream[start:end + 1], scored - start))
        scored, start = end, start + stride
    return out


def read_texts(paths: list[str], jsonl: list[str], field: str) -> list[tuple[str, str]]:
    """(name, text) of every file and every `field` of every JSONL line."""
    texts = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise DataError(f"--text {path}: no such file")
        texts.append((str(path), read_text(path)))
    for p in jsonl:
        path = Path(p)
        if not path.is_file():
            raise DataError(f"--jsonl {path}: no such file")
        for lineno, record in jsonl_records(path):
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise DataError(f"{path}:{lineno}: no string field {field!r}")
            texts.append((f"{path}:{lineno}", record[field]))
    if not any(text for _, text in texts):
        raise DataError("nothing to evaluate: give --text FILE or --jsonl FILE with non-empty texts")
    return texts


def primer_of(paths: list[str] | None, checkpoint: Path, cfg) -> tuple[bytes, str]:
    """The primer's bytes and where they come from: the files (None: the run's training text when its prepared
    data is still there, else nothing; []: nothing)."""
    if paths is not None:
        missing = [p for p in paths if not Path(p).is_file()]
        if missing:
            raise DataError(f"--prime {missing[0]}: no such file")
        return "".join(read_text(Path(p)) for p in paths).encode(), ", ".join(paths)
    from llm_jax.data.prepare import Prepared
    data = Path(cfg.data.prepared) if cfg.data.prepared else checkpoint / "data"
    try:
        return Prepared.load(data).text_tail("train", baselines.XZ_DICTIONARY), f"the training text in {data}"
    except DataError:  # gone, or not pretraining's token shards
        return b"", ""


def objective(runner: ModelRunner):
    """(params, TokenBatch) -> summed nats, tokens and bytes: the pretraining task's objective, so that
    model.logits_chunk applies as in training."""
    model = runner.model()
    return lambda params, batch: next_token_sums(model, params, batch)


def evaluate_texts(runner: ModelRunner, tokenizer, texts: list[str], context: int, stride: int,
                   batch_size: int = 16) -> dict:
    """Summed nats, tokens and bytes of every text under the model, scored in windows (see module doc)."""
    runner.check_length(context, "--context")
    sums = runner.jit_batch(objective(runner), TokenBatch.axes())
    batch_size = runner.round_rows(batch_size)
    byte_lengths = tokenizer.byte_lengths()
    all_windows = [w for ids in tokenizer.encode_batch(texts) for w in windows(ids, tokenizer.eos_id, context, stride)]
    totals = {"nats": 0.0, "tokens": 0.0, "bytes": 0.0}
    for start in range(0, len(all_windows), batch_size):
        batch = _batch(all_windows[start:start + batch_size], batch_size, context, byte_lengths, tokenizer.pad_id)
        for k, v in jax.device_get(sums(runner.params, batch)).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    return totals


def _batch(chunk: list[Window], batch_size: int, context: int, byte_lengths: np.ndarray, pad_id: int) -> TokenBatch:
    inputs = np.full((batch_size, context), pad_id, np.int32)
    targets, segments = inputs.copy(), np.zeros_like(inputs)
    weights = np.zeros((batch_size, context), np.float32)
    for row, w in enumerate(chunk):
        n = len(w.tokens) - 1
        inputs[row, :n], targets[row, :n], segments[row, :n] = w.tokens[:-1], w.tokens[1:], 1
        weights[row, w.first_scored:n] = 1.0
    return TokenBatch(inputs=inputs, targets=targets, segment_ids=segments, positions=positions_from_segments(segments),
                      weights=weights, target_bytes=byte_lengths[targets].astype(np.int32))


def report(totals: dict, scored: list[bytes], primer: bytes = b"", primer_source: str = "") -> dict:
    """The model's rates and each compressor's on the same bytes (`scored`: each text's scored_bytes), primed
    ones too when there is a primer."""
    data = [d for d in scored if d]
    n_bytes = sum(map(len, data))
    if int(totals["bytes"]) != n_bytes:
        raise RuntimeError(f"scored {int(totals['bytes'])} bytes but the texts have {n_bytes}: the byte table "
                           "and the tokenizer disagree")
    primed = baselines.Primer(primer)
    # Each compressor runs once per text; primed, after the primer, whose size alone is measured once.
    per_text = [({**baselines.bits_per_byte(d), **(primed.primed_bits_per_byte(d) if primer else {})}, len(d))
                for d in data]
    compressors = {k: sum(bits[k] * size for bits, size in per_text) / n_bytes for k in per_text[0][0]}
    rates = compression_rates(totals)
    return {"texts": len(scored), "bytes": n_bytes, "tokens": int(totals["tokens"]),
            "bits_per_token": float(rates["bits_per_token"]), "bits_per_byte": float(rates["bits_per_byte"]),
            "tokens_per_byte": totals["tokens"] / n_bytes, "baselines_bits_per_byte": compressors,
            **({"primer": {"source": primer_source, "bytes": len(primer)}} if primer else {})}


def format_report(r: dict, as_json: bool) -> str:
    if as_json:
        return json.dumps(r, indent=2)
    head = (f"{r['texts']} texts, {r['bytes']:,} bytes, {r['tokens']:,} tokens: {r['bits_per_token']:.4f} bits/token, "
            f"{r['tokens_per_byte']:.4f} tokens/byte")
    if "primer" in r:
        head += f"\nprimed: after {r['primer']['bytes']:,} bytes of {r['primer']['source']}"
    return head + "\n" + baselines.format_comparison(r["bits_per_byte"], r["baselines_bits_per_byte"])
