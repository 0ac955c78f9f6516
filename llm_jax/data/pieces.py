"""What every tokenizer here shares: its serialized model and the exact bytes of each piece."""
from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from llm_jax.errors import DataError

SPECIAL_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


class PieceTable:
    """What every tokenizer here shares: its serialized model and the exact bytes of each piece, from which
    decoding, per-token byte counts (bits per byte) and the identity (sha256) follow.

    `lossless`: decode_bytes(encode(text)) == text.encode() for every text (sentencepiece with byte fallback,
    byte-level BPE). A lossy tokenizer (WordPiece) defines its pieces' bytes, and bits per byte count those:
    the bytes of the text as the tokenizer gives it back (scored_bytes)."""
    lossless = True

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

    @property
    def specials(self) -> dict[str, int]:
        """The special tokens by their text ("<|end|>", "[SEP]", "<|im_end|>"): ids that text never encodes to.
        Read-only (shared, not copied)."""
        raise NotImplementedError

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt a person wrote: the special tokens spelt in it ("[CLS]", "<|im_start|>") become
        their ids, as Hugging Face tokenizers do; encode() keeps them text, so dialogue content cannot forge a
        turn."""
        ids, start = [], 0
        for match in _special_pattern(tuple(self.specials)).finditer(text) if self.specials else ():
            ids += self.encode(text[start:match.start()]) if match.start() > start else []
            ids.append(self.specials[match.group()])
            start = match.end()
        return ids + (self.encode(text[start:]) if start < len(text) else [])

    def scored_bytes(self, text: str) -> bytes:
        """The bytes bits per byte divide by for `text`: the text's own, or for a lossy tokenizer those of its
        tokens (see `lossless`)."""
        return text.encode() if self.lossless else self.decode_bytes(self.encode(text))

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



class HFJsonTokenizer(PieceTable):
    """What the Hugging Face `tokenizers` kinds share (byte_bpe.py, wordpiece.py): a tokenizer.json, parsed by
    `tokenizers` with its special tokens never matched in text (typed, they stay text: a dialogue cannot forge a
    turn), the added special tokens as `specials`, which are no bytes; subclasses give the others' bytes."""
    KIND = "tokenizer.json"

    def __init__(self, data: bytes):
        try:
            import tokenizers
        except ImportError:
            raise DataError(f"a {self.KIND} needs the `tokenizers` package: pip install -e '.[hf]'") from None
        self.spec = json.loads(data)
        self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        self._tok.encode_special_tokens = True
        self._specials = {t["content"]: t["id"] for t in self.spec.get("added_tokens", []) if t.get("special")}
        specials = set(self._specials.values())
        super().__init__(data, [b"" if i in specials else self.token_bytes(i, self._tok.id_to_token(i) or "")
                                for i in range(self._tok.get_vocab_size(with_added_tokens=True))])

    def token_bytes(self, i: int, token: str) -> bytes:
        """The bytes of token `i`, whose text in the vocabulary is `token` (not a special token)."""
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: bytes, path: str | Path | None = None):
        try:
            return cls(data)
        except DataError:
            raise
        except Exception as e:  # json's or tokenizers' parse errors
            raise DataError(f"{path or 'tokenizer'}: not a {cls.KIND} ({str(e).splitlines()[0]})") from None

    @property
    def vocab_size(self) -> int:
        return len(self._piece_bytes)

    @property
    def specials(self) -> dict[str, int]:
        return self._specials

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

@functools.lru_cache(maxsize=8)
def _special_pattern(specials: tuple[str, ...]) -> re.Pattern:
    return re.compile("|".join(map(re.escape, sorted(specials, key=len, reverse=True))))
