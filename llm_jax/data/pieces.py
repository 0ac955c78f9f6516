"""What every tokenizer here shares: its serialized model and the exact bytes of each piece."""
from __future__ import annotations

import hashlib
from typing import Iterable, Sequence

import numpy as np

SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class PieceTable:
    """What every tokenizer here shares: its serialized model and the exact bytes of each piece, from which
    decoding, per-token byte counts (bits per byte) and the identity (sha256) follow."""

    def __init__(self, data: bytes, piece_bytes: list[bytes]):
        self._data, self._piece_bytes = data, piece_bytes
        self._byte_lengths_V = np.array([len(b) for b in piece_bytes], np.int32)
        self._byte_lengths_V.flags.writeable = False
        self.sha256 = hashlib.sha256(data).hexdigest()

    def __reduce__(self):  # picklable (as its serialized model) for grain worker processes
        return type(self), (self._data,)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without BOS or EOS."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        raise NotImplementedError

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The exact bytes of ids: byte pieces stay raw bytes, so a UTF-8 character cut in two is not lost."""
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        return b"".join([self._piece_bytes[i] for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def byte_lengths(self) -> np.ndarray:
        """int32[vocab_size]: UTF-8 bytes each piece decodes to (0 for pad/unk/bos/eos/specials)."""
        return self._byte_lengths_V

    def serialized(self) -> bytes:
        return self._data
