"""Hugging Face byte-level BPE tokenizers (GPT-2's tokenizer.json) behind the interface of data/tokenizer.py."""
from __future__ import annotations

import json

from llm_jax.data.pieces import HFJsonTokenizer
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


class ByteLevelBPETokenizer(HFJsonTokenizer):
    """A Hugging Face byte-level BPE tokenizer.json (GPT-2's) behind the same interface as Tokenizer.

    Needs the optional `tokenizers` package. Every token's bytes are exact through the GPT-2 byte table, and
    the tokenizer is lossless (every text is bytes mapped to characters) unless its tokenizer.json normalises
    the text first: Qwen2's applies NFC, so text not already in NFC ("e" + a combining accent) comes back
    composed; bits per byte then count the NFC bytes (PieceTable.scored_bytes) and `compress` refuses such
    input. Added special tokens ("<|endoftext|>") decode to
    no bytes and are never produced from text by encode() (typed in a text they encode as ordinary tokens;
    encode_prompt parses them). bos, eos and pad are all "<|endoftext|>" (or the first added special token);
    there is no unk (unk_id is -1).
    """

    _BYTE_OF = gpt2_byte_decoder()

    def __init__(self, data: bytes):
        spec = json.loads(data)
        if (spec.get("model") or {}).get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
            raise DataError("tokenizer.json: only byte-level BPE tokenizers (GPT-2's) are supported, this one has "
                            f"model {(spec.get('model') or {}).get('type')!r} and decoder "
                            f"{(spec.get('decoder') or {}).get('type')!r}")
        super().__init__(data)
        self.lossless = spec.get("normalizer") is None
        eos = self._tok.token_to_id("<|endoftext|>")
        self._eos = eos if eos is not None else (min(self._specials.values()) if self._specials else -1)

    def token_bytes(self, i: int, token: str) -> bytes:
        try:
            return bytes(self._BYTE_OF[c] for c in token)
        except KeyError:
            raise DataError(f"tokenizer.json: token {i} ({token!r}) is not in the GPT-2 byte alphabet") from None

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

