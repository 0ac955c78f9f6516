"""Lossless compression with a language model: arithmetic coding driven by its next-token distribution.

"Prediction is compression", literally: a token the model gives probability p costs about -log2 p bits, so
the payload is within a fraction of a percent of the model's cross-entropy on the file (plus the header).

Bytes -> tokens is exactly reversible for any bytes: maximal valid UTF-8 runs are tokenized as text, every
other byte becomes its byte-fallback piece (sentencepiece ids 8..263, or a GPT-2 byte token), and
compression checks decode_bytes(tokens) == data. A lossy tokenizer (WordPiece) is used only where its tokens
give the input back exactly (Chinese text without whitespace); other input is refused before anything is
written.

Windows: the tokens are cut into windows of `context` tokens, and each window starts from a fresh KV cache
whose first input is EOS (pretraining documents end with EOS, so "after EOS" means "start of a document").
The model therefore never sees across a window boundary: the first tokens of every window are predicted with
little context, which costs a little on long files, in exchange for a bounded cache and positions the model
was trained on.

Determinism: encoder and decoder must agree bit for bit on every distribution. Both run the same jitted
one-token step (same shapes, same inputs, a fresh cache of the same length per window) and then the same
numpy code quantising float32 logits into integer frequencies; a full-sequence forward on one side only
would differ in the last bits. Decompress on the machine type (and software versions) that compressed.

Format (big-endian), HEADER_SIZE = 93 bytes, then the arithmetic-coded payload:
    magic b"LLMZ" | version u8 | model sha256 (32 bytes: params and model config) | tokenizer sha256 (32) |
    original byte length u64 | token count u64 | context u32 | crc32 of the original bytes u32
Version 2 hashes the model config's fields that differ from their defaults (but model.dropout, which changes
no prediction), so a field added to ModelConfig later leaves old files readable; version 1 (still read) hashed
the config's repr as it was then.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import struct
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.atomic import write_atomic
from llm_jax.config import ModelConfig
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import CheckpointError, DataError
from llm_jax.inference.arithmetic import CODE_BITS, Decoder, Encoder, decode_symbol, quantise
from llm_jax.inference.runner import ModelRunner, default_context

MAGIC = b"LLMZ"
VERSION = 2
_HEADER = struct.Struct(">4sB32s32sQQII")
HEADER_SIZE = _HEADER.size
_INVALID_RUNS = re.compile("([\udc80-\udcff]+)")


# ---- bytes <-> tokens ----

def byte_piece_ids(tokenizer) -> list[int]:
    """For each byte value, the lowest id that decodes to exactly that byte (a sentencepiece byte piece, a
    GPT-2 byte token): invalid UTF-8 cannot go through encode(), so it is spelt with these."""
    ids: dict[bytes, int] = {}
    for i in range(tokenizer.vocab_size):
        ids.setdefault(tokenizer.decode_bytes([i]), i)
    missing = [b for b in range(256) if bytes([b]) not in ids]
    if missing:
        raise DataError(f"tokenizer {tokenizer.sha256[:12]}… has no token for byte(s) "
                        f"{', '.join(f'0x{b:02x}' for b in missing[:8])}: it cannot spell arbitrary bytes")
    return [ids[bytes([b])] for b in range(256)]


def to_tokens(data: bytes, tokenizer: Tokenizer) -> list[int]:
    """Tokens that decode_bytes back to exactly `data`: valid UTF-8 runs as text, other bytes as byte pieces."""
    if not tokenizer.lossless:
        return _lossy_tokens(data, tokenizer)
    byte_ids = byte_piece_ids(tokenizer)
    # surrogateescape turns each invalid byte into a lone surrogate, which valid UTF-8 never decodes to.
    parts = _INVALID_RUNS.split(data.decode("utf-8", "surrogateescape"))
    tokens: list[int] = []
    for k, part in enumerate(parts):
        raw = part.encode("utf-8", "surrogateescape")
        ids = tokenizer.encode(part) if k % 2 == 0 and part else []
        if tokenizer.decode_bytes(ids) != raw:  # invalid bytes (odd parts); for text, never expected
            ids = [byte_ids[b] for b in raw]
        tokens += ids
    if tokenizer.decode_bytes(tokens) != data:
        raise DataError("internal error: tokens do not decode to the input bytes")
    return tokens


def _lossy_tokens(data: bytes, tokenizer: Tokenizer) -> list[int]:
    """The tokens of `data` if they give it back exactly, else a DataError at the first byte they change."""
    text = data.decode("utf-8", "replace")
    tokens = tokenizer.encode(text)
    back = tokenizer.decode_bytes(tokens)
    if back != data:
        at = next((i for i, (a, b) in enumerate(zip(data, back)) if a != b), min(len(data), len(back)))
        raise DataError(f"this {type(tokenizer).__name__} cannot reproduce the input, so it cannot compress it "
                        f"losslessly: its tokens change byte {at} ({data[at:at + 12]!r} becomes {back[at:at + 12]!r})")
    return tokens


# ---- the model's next-token distributions, computed identically on both sides ----

def model_sha256(runner: ModelRunner, version: int = VERSION) -> bytes:
    """sha256 over the model config and every param leaf (path, dtype, shape, bytes) in tree order, as the
    format `version` defines it."""
    cfg = runner.cfg
    if version == 1:  # ModelConfig's repr before model.qkv_bias and model.dropout existed
        config = repr(cfg).replace(", qkv_bias=False", "").replace(", dropout=0.0", "")
    else:  # (dropout changes no prediction, and no file made before it existed)
        default = ModelConfig()
        config = json.dumps({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "dropout"
                             and getattr(cfg, f.name) != getattr(default, f.name)}, sort_keys=True)
    h = hashlib.sha256(config.encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(runner.params)[0]:
        host = np.ascontiguousarray(jax.device_get(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{host.dtype}|{host.shape}".encode())
        h.update(host.tobytes())
    return h.digest()


class Predictor:
    """One jitted decode step at batch 1; windows of `context` tokens, each from a fresh cache fed EOS first."""

    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer, context: int):
        self.runner, self.context, self.eos = runner, context, tokenizer.eos_id
        self.vocab = tokenizer.vocab_size  # the model's table may be larger; those ids are never coded
        runner.check_length(context, "compression context")
        self.model = runner.model(decode=True)
        self._step = runner.jit(self._step_fn, donate_argnums=(1,))
        self.cache = None

    def _step_fn(self, params, cache, token_1x1, position_1x1):
        logits, updated = self.model.apply({"params": params, "cache": cache}, token_1x1, position_1x1,
                                           jnp.ones_like(token_1x1), mutable=["cache"])
        return logits[0, -1].astype(jnp.float32), updated["cache"]

    def logits(self, index: int, previous: int) -> np.ndarray:
        """float32 logits for token `index` of the file, given the token before it (ignored at a window start)."""
        position = index % self.context
        if position == 0:
            self.cache = self.runner.empty_cache(1, self.context)
            previous = self.eos
        inputs = np.array([[previous]], np.int32), np.array([[position]], np.int32)
        logits_V, self.cache = self._step(self.runner.params, self.cache, *inputs)
        return np.asarray(jax.device_get(logits_V))[:self.vocab]


# ---- bytes in, bytes out ----

def compress_with_stats(data: bytes, runner: ModelRunner, tokenizer: Tokenizer, context: int) -> tuple[bytes, dict]:
    """The compressed blob and its stats (sizes, tokens, the model's cross-entropy in bits)."""
    tokens = to_tokens(data, tokenizer)
    predictor, encoder, ce_bits = Predictor(runner, tokenizer, context), Encoder(), 0.0
    for i, token in enumerate(tokens):
        p_V, cum_V1 = quantise(predictor.logits(i, tokens[i - 1] if i else 0))
        ce_bits -= float(np.log2(p_V[token]))
        encoder.encode(int(cum_V1[token]), int(cum_V1[token + 1]), int(cum_V1[-1]))
    payload = encoder.finish() if tokens else b""
    header = _HEADER.pack(MAGIC, VERSION, model_sha256(runner), bytes.fromhex(tokenizer.sha256),
                          len(data), len(tokens), context, zlib.crc32(data))
    blob = header + payload
    return blob, {"input_bytes": len(data), "output_bytes": len(blob), "payload_bytes": len(payload),
                  "header_bytes": HEADER_SIZE, "tokens": len(tokens), "context": context,
                  "cross_entropy_bits": ce_bits, "cross_entropy_bytes": ce_bits / 8,
                  "bits_per_byte": 8 * len(blob) / len(data) if data else 0.0,
                  "model_bits_per_byte": ce_bits / len(data) if data else 0.0}


def compress_bytes(data: bytes, runner: ModelRunner, tokenizer: Tokenizer, context: int) -> bytes:
    return compress_with_stats(data, runner, tokenizer, context)[0]


def read_header(blob: bytes) -> dict:
    if len(blob) < HEADER_SIZE or blob[:4] != MAGIC:
        raise DataError("not an llm_jax compressed file (bad magic or shorter than the header)")
    magic, version, model_sha, tok_sha, n_bytes, n_tokens, context, crc = _HEADER.unpack_from(blob)
    if version not in (1, VERSION):
        raise DataError(f"compressed format version {version} is not supported (this reads 1 and {VERSION})")
    if n_tokens > n_bytes:  # every coded token is at least one byte
        raise DataError(f"corrupt header: {n_tokens} tokens for {n_bytes} bytes")
    return {"model_sha256": model_sha, "tokenizer_sha256": tok_sha, "bytes": n_bytes, "tokens": n_tokens,
            "context": context, "crc32": crc, "version": version}


def check_same_model(header: dict, runner: ModelRunner, tokenizer: Tokenizer) -> None:
    theirs, ours = header["tokenizer_sha256"].hex(), tokenizer.sha256
    if theirs != ours:
        raise CheckpointError(f"compressed with a different tokenizer (tokenizer sha256 {theirs[:12]}… vs "
                              f"{ours[:12]}…)")
    theirs, ours = header["model_sha256"].hex(), model_sha256(runner, header["version"]).hex()
    if theirs != ours:
        raise CheckpointError(f"compressed with a different checkpoint (params sha256 {theirs[:12]}… vs "
                              f"{ours[:12]}…)")


def decompress_bytes(blob: bytes, runner: ModelRunner, tokenizer: Tokenizer) -> bytes:
    header = read_header(blob)
    check_same_model(header, runner, tokenizer)
    if header["tokens"] == 0:
        if header["bytes"]:
            raise DataError("corrupt header: no tokens for a non-empty file")
        return b""
    predictor, decoder = Predictor(runner, tokenizer, header["context"]), Decoder(blob[HEADER_SIZE:])
    tokens: list[int] = []
    lengths_V = tokenizer.byte_lengths()
    n_bytes = 0
    for i in range(header["tokens"]):
        _, cum_V1 = quantise(predictor.logits(i, tokens[-1] if tokens else 0))
        tokens.append(decode_symbol(decoder, cum_V1))
        n_bytes += int(lengths_V[tokens[-1]])
        if n_bytes > header["bytes"] or decoder.overrun() > CODE_BITS:
            raise DataError("compressed data is truncated or corrupt (decoding ran past the recorded size)")
    data = tokenizer.decode_bytes(tokens)
    if len(data) != header["bytes"] or zlib.crc32(data) != header["crc32"]:
        raise DataError("compressed data is truncated or corrupt (checksum mismatch)")
    return data


# ---- files ----

def _read(path: Path) -> bytes:
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    return path.read_bytes()


def compress_file(checkpoint_dir, in_path, out_path, step: int | None = None, context: int | None = None) -> dict:
    """Compresses in_path into out_path with a checkpoint's model; returns the stats (and seconds taken)."""
    data = _read(Path(in_path))
    cfg, runner, tokenizer = ModelRunner.load(Path(checkpoint_dir), step)
    start = time.perf_counter()
    blob, stats = compress_with_stats(data, runner, tokenizer, context or default_context(cfg))
    stats["seconds"] = time.perf_counter() - start
    write_atomic(Path(out_path), blob)
    return stats


def decompress_file(checkpoint_dir, in_path, out_path, step: int | None = None) -> dict:
    """Restores out_path from in_path; nothing is written unless the data decodes and its checksum matches."""
    blob = _read(Path(in_path))
    read_header(blob)  # a clear error before spending time on loading the model
    _, runner, tokenizer = ModelRunner.load(Path(checkpoint_dir), step)
    start = time.perf_counter()
    data = decompress_bytes(blob, runner, tokenizer)
    seconds = time.perf_counter() - start
    write_atomic(Path(out_path), data)
    return {"input_bytes": len(blob), "output_bytes": len(data), "seconds": seconds}
