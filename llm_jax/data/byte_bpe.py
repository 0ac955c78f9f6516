"""Hugging Face byte-level BPE tokenizers (GPT-2's tokenizer.json) behind the interface of data/tokenizer.py."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from llm_jax.data.pieces import SPECIAL_TOKENS, PieceTable
from llm_jax.errors import DataError


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's reversible byte <-> unicode table, as a character -> byte map: printable bytes stand for
    themselves, the others (controls, space, ...) for the characters from U+0100 on, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c: b for b, c in chars.items()}


class ByteLevelBPETokenizer(PieceTable):
    """A Hugging Face byte-level BPE tokenizer.json (GPT-2's) behind the same interface as Tokenizer.

    Needs the optional `tokenizers` package. Lossless (every text is bytes mapped to characters), and every
    token's bytes are exact through the GPT-2 byte table. Added special tokens ("<|endoftext|>") decode to
    no bytes and are never produced from text (typed in a text they encode as ordinary tokens). bos, eos
    and pad are all "<|endoftext|>" (or the first added special token); there is no unk (unk_id is -1). The
    chat tokens of SPECIAL_TOKENS map to their ids where the vocabulary has them, else to eos_id.
    """

    def __init__(self, data: bytes):
        try:
            import tokenizers
        except ImportError:
            raise DataError("a tokenizer.json needs the `tokenizers` package: pip install -e '.[hf]'") from None
        spec = json.loads(data)
        if (spec.get("model") or {}).get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise DataError("tokenizer.json: only byte-level BPE tokenizers (GPT-2's) are supported, this one has "
                            f"model {(spec.get('model') or {}).get('type')!r} and decoder "
                            f"{(spec.get('decoder') or {}).get('type')!r}")
        self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        if hasattr(self._tok, "encode_special_tokens"):
            self._tok.encode_special_tokens = True  # "<|endoftext|>" typed in a text stays text
        special = {t["id"]: t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
        byte_of = gpt2_byte_decoder()
        piece_bytes = []
        for i in range(self._tok.get_vocab_size(with_added_tokens=True)):
            token = self._tok.id_to_token(i)
            if i in special or token is None:
                piece_bytes.append(b"")
                continue
            try:
                piece_bytes.append(bytes(byte_of[c] for c in token))
            except KeyError:
                raise DataError(f"tokenizer.json: token {i} ({token!r}) is not in the GPT-2 byte alphabet") from None
        super().__init__(data, piece_bytes)
        eos = self._tok.token_to_id("<|endoftext|>")
        self._eos = eos if eos is not None else (min(special) if special else -1)

    @classmethod
    def from_json(cls, data: bytes, path: str | Path | None = None) -> ByteLevelBPETokenizer:
        try:
            return cls(data)
        except DataError:
            raise
        except Exception as e:  # json's or tokenizers' parse errors
            raise DataError(f"{path or 'tokenizer'}: not a tokenizer.json ({str(e).splitlines()[0]})") from None

    @property
    def vocab_size(self) -> int:
        return len(self._piece_bytes)

    @property
    def unk_id(self) -> int:
        return -1

    @property
    def pad_id(self) -> int:
        return self._eos

    @property
    def bos_id(self) -> int:
        return self._eos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def special_ids(self) -> dict[str, int]:
        ids = {name: self._tok.token_to_id(name) for name in SPECIAL_TOKENS}
        return {name: self._eos if i is None else i for name, i in ids.items()}

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
