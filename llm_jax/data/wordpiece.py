"""BERT WordPiece tokenizers (`vocab.txt` + `tokenizer_config.json`, as the classic Chinese GPT-2 uses) behind the
interface of data/tokenizer.py, built with the `tokenizers` package exactly as transformers' BertTokenizerFast
builds them (BERT normaliser, BERT pre-tokenizer, WordPiece with "##" continuations), so the ids are the same.

WordPiece is lossy: the pre-tokenizer drops whitespace and splits around every CJK character and punctuation
mark, the normaliser drops control characters, and words outside the vocabulary become [UNK]. A token's bytes
are therefore defined, not recovered, and bits per byte count these bytes:
  - a continuation piece ("##ing") is its text without "##";
  - a piece that starts a word with a letter or digit (not a CJK character) is a space, then its text;
  - any other piece (a CJK character, punctuation) is its text, with no space;
  - special tokens ([CLS], [SEP], [PAD], [UNK], [MASK]) are no bytes.
Decoding is the same table, so the spaces WordPiece puts between CJK characters are gone ("今天天气" stays
"今天天气") and English words are separated by one space ("hello world", from a leading space). Chinese text
without whitespace or unknown characters decodes to exactly its bytes; other text may not (whitespace runs
become one space, a space before a word that followed a CJK character or punctuation appears or disappears,
[UNK] spans vanish). `compress`, which must reproduce its input, refuses such input (inference/codec.py).

Serialized form: the `tokenizers` JSON (what transformers writes as tokenizer.json), saved as an export's
tokenizer.model like every other tokenizer; Tokenizer.load recognises it by its model type.
"""
from __future__ import annotations

import json
from pathlib import Path

from llm_jax.data.pieces import HFJsonTokenizer
from llm_jax.errors import DataError

SPECIAL_KEYS = ("pad_token", "unk_token", "cls_token", "sep_token", "mask_token")
DEFAULT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
                    "mask_token": "[MASK]"}


def is_cjk(char: str) -> bool:
    """A CJK ideograph in BERT's sense (tokenize_chinese_chars): the pre-tokenizer makes each one a word."""
    cp = ord(char)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2CEAF
            or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def piece_bytes(piece: str) -> bytes:
    """The bytes a non-special WordPiece piece stands for (see the module doc)."""
    if piece.startswith("##") and len(piece) > 2:
        return piece[2:].encode()
    spaced = piece[:1].isalnum() and not is_cjk(piece[0])
    return (" " + piece if spaced else piece).encode()


def from_vocab(vocab_path: Path, config_path: Path | None = None) -> bytes:
    """The `tokenizers` JSON of a BERT tokenizer: `vocab_path` (vocab.txt, line n = id n - 1) with the settings of
    `config_path` (tokenizer_config.json; BERT's defaults without one)."""
    try:
        from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    except ImportError:
        raise DataError("a WordPiece vocab.txt needs the `tokenizers` package: pip install -e '.[hf]'") from None
    if not vocab_path.is_file():
        raise DataError(f"WordPiece vocabulary {vocab_path} does not exist")
    try:
        lines = vocab_path.read_text(encoding="utf-8").split("\n")
        settings = json.loads(config_path.read_text()) if config_path is not None and config_path.is_file() else {}
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{vocab_path.parent}: vocab.txt or tokenizer_config.json is unreadable ({e})") from None
    vocab = {}
    for token in (line.rstrip("\r") for line in (lines[:-1] if lines[-1] == "" else lines)):
        vocab.setdefault(token, len(vocab))  # a repeated line keeps its first id, as BERT's loader does
    if settings.get("do_basic_tokenize", True) is False:
        raise DataError(f"{config_path}: do_basic_tokenize=false is not supported (only BERT's basic tokenizer)")
    specials = {key: settings.get(key) or DEFAULT_SPECIALS[key] for key in SPECIAL_KEYS}
    renamed = [f"{key}={name!r}" for key, name in specials.items() if name != DEFAULT_SPECIALS[key]]
    if renamed:  # bos/eos/pad are found by their usual names ([CLS], [SEP], [PAD])
        raise DataError(f"{config_path}: special tokens other than BERT's are not supported ({', '.join(renamed)})")
    if specials["unk_token"] not in vocab:
        raise DataError(f"{vocab_path}: the unknown token {specials['unk_token']!r} is not in the vocabulary")
    tok = Tokenizer(models.WordPiece(vocab, unk_token=specials["unk_token"], max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=settings.get("tokenize_chinese_chars", True),
        strip_accents=settings.get("strip_accents"), lowercase=settings.get("do_lower_case", True))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens([t for t in specials.values() if t in vocab])
    return tok.to_str().encode()


class WordPieceTokenizer(HFJsonTokenizer):
    """A BERT WordPiece tokenizer (its `tokenizers` JSON) behind the interface of Tokenizer; lossy (module doc).

    bos is [CLS], eos and the end of a turn [SEP], pad [PAD]: what the classic Chinese GPT-2 demos use. Special
    tokens typed in a text encode as ordinary pieces; `encode_prompt` turns them into their ids."""
    lossless = False
    KIND = "WordPiece tokenizer.json"

    def __init__(self, data: bytes):
        super().__init__(data)
        self._unk = self._specials.get(self.spec["model"].get("unk_token"), -1)

    def token_bytes(self, i: int, token: str) -> bytes:
        return piece_bytes(token)

    @property
    def unk_id(self) -> int:
        return self._unk

    @property
    def pad_id(self) -> int:
        return self._specials.get("[PAD]", self.eos_id)

    @property
    def bos_id(self) -> int:
        return self._specials.get("[CLS]", -1)

    @property
    def eos_id(self) -> int:
        return self._specials.get("[SEP]", -1)


    def hf_files(self) -> dict[str, bytes]:
        """vocab.txt and tokenizer_config.json as transformers' BertTokenizer reads them (and tokenizer.json)."""
        spec = self.spec
        norm = spec["normalizer"]
        settings = {"tokenizer_class": "BertTokenizer", "do_lower_case": norm["lowercase"], "do_basic_tokenize": True,
                    "tokenize_chinese_chars": norm["handle_chinese_chars"], "strip_accents": norm["strip_accents"],
                    **{key: name for key, name in DEFAULT_SPECIALS.items() if name in self._specials},
                    "unk_token": spec["model"]["unk_token"]}
        vocab = "".join(self._tok.id_to_token(i) + "\n" for i in range(self.vocab_size))
        return {"vocab.txt": vocab.encode(), "tokenizer_config.json": json.dumps(settings, indent=2).encode(),
                "tokenizer.json": self.serialized()}
