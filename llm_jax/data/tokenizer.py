"""SentencePiece tokenizer: trained on an in-memory corpus sample, lossless on any text, exact in bytes.

Vocabulary layout: 0 <pad>, 1 <unk>, 2 <s> (BOS), 3 </s> (EOS), 4-7 SPECIAL_TOKENS, 8-263 the byte pieces
<0x00>..<0xFF>, then the learned pieces. SPECIAL_TOKENS are control symbols: reserved now so that chat SFT
needs no new vocabulary, only ever inserted by id, never produced from text ("<|user|>" typed in a text
encodes as ordinary pieces).

Nothing is normalised (identity rule, no dummy prefix, whitespace kept) and characters outside the vocabulary
fall back to their UTF-8 bytes, so decode(encode(s)) == s for every string. Newlines, tabs and indentation are
ordinary characters: the trainer sees multi-line chunks of text, so pieces like "):\\n" or runs of spaces form.

A corpus too small for the vocabulary: when its characters alone would not leave half of the learnable
pieces for merges, the rarer characters are left to byte fallback (the trainer never sees them); when it cannot
supply vocab_size distinct pieces, the tokenizer is trained with as many as it can (a warning says so), and
is then smaller than requested, which the model's embedding table tolerates.
"""
from __future__ import annotations

import collections
import functools
import io
import itertools
import json
import re
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from llm_jax.data import wordpiece
from llm_jax.data.byte_bpe import ByteLevelBPETokenizer
from llm_jax.data.pieces import SPECIAL_TOKENS, PieceTable
from llm_jax.data.wordpiece import WordPieceTokenizer
from llm_jax.errors import DataError

N_RESERVED = 4 + len(SPECIAL_TOKENS) + 256  # pad/unk/bos/eos, specials, byte pieces
SENTENCE_BYTES = 8192  # longest chunk the trainer sees as one "sentence"
CHARACTER_COVERAGE = 0.9995
ENCODE_CHARS = 8192  # encode_batch cuts longer texts into pieces of about this size
_WORD_START = re.compile("(?<![ \u2581]) ")  # U+2581 "▁" in a text also counts as whitespace


class Tokenizer(PieceTable):
    """A sentencepiece model plus the exact bytes of every piece."""

    def __init__(self, proto: bytes):
        self._sp = spm.SentencePieceProcessor(model_proto=proto)
        super().__init__(proto, [_piece_bytes(self._sp, i) for i in range(self._sp.vocab_size())])

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer model {path} does not exist")
        if path.name == "vocab.txt":  # a BERT WordPiece vocabulary, with its settings beside it
            return WordPieceTokenizer(wordpiece.from_vocab(path, path.parent / "tokenizer_config.json"))
        data = path.read_bytes()
        if path.suffix == ".json" or _is_json(data):  # a Hugging Face tokenizer.json
            return _from_json(data, path)
        try:
            return cls(data)
        except RuntimeError as e:
            raise DataError(f"{path}: not a sentencepiece model ({str(e).splitlines()[0]})") from None

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def pad_id(self) -> int:
        # Foreign sentencepiece models (an imported Llama's) often define no pad: pad with EOS, never -1.
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eos_id

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @functools.cached_property
    def specials(self) -> dict[str, int]:  # a scan of the vocabulary: once
        return {self._sp.id_to_piece(i): i for i in range(self._sp.vocab_size()) if self._sp.is_control(i)}

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """encode() of each text, on all cores (sentencepiece's own thread pool).

        Texts are encoded in pieces of about ENCODE_CHARS cut at word starts, which no token spans: one long
        document no longer leaves all threads but one idle, and BPE runs ~3x faster on short inputs. For BPE
        the ids equal sentencepiece's on the whole text; unigram may break exact score ties differently.
        """
        pieces = [_word_aligned_pieces(text) for text in texts]
        ids = iter(self._sp.encode([p for ps in pieces for p in ps]))
        return [list(itertools.chain.from_iterable(itertools.islice(ids, len(ps)))) for ps in pieces]


def check_fits(tokenizer: PieceTable, vocab_size: int, name: str) -> None:
    """A model of model.vocab_size=vocab_size embeddings reads every id of the tokenizer (called `name`)."""
    if tokenizer.vocab_size > vocab_size:
        raise DataError(f"{name} has {tokenizer.vocab_size} pieces, more than model.vocab_size={vocab_size}; "
                        "raise model.vocab_size")


def _piece_bytes(sp: spm.SentencePieceProcessor, i: int) -> bytes:
    if sp.is_byte(i):
        return bytes([int(sp.id_to_piece(i)[1:-1], 16)])  # "<0xAB>"
    if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
        return b""
    return sp.id_to_piece(i).replace("\u2581", " ").encode()


def _word_aligned_pieces(text: str) -> list[str]:
    # A space after a non-space always starts a new sentencepiece word (split_by_whitespace), and the
    # trainer never makes a piece cross a word start: encoding the pieces apart changes no token.
    pieces, start = [], 0
    while len(text) - start > 2 * ENCODE_CHARS:
        cut = _WORD_START.search(text, start + ENCODE_CHARS)
        if not cut:
            break
        pieces.append(text[start:cut.start()])
        start = cut.start()
    return pieces + [text[start:]]


def train_tokenizer(texts: Iterable[str], model_prefix: Path, vocab_size: int, model_type: str = "bpe",
                    sample_bytes: int = 8_000_000) -> Tokenizer:
    """Trains on the first sample_bytes of texts; writes `{model_prefix}.model`."""
    if vocab_size < N_RESERVED + 2:
        raise DataError(f"vocab_size={vocab_size} is too small: {N_RESERVED} ids are reserved "
                        "(pad/unk/bos/eos, chat specials, 256 bytes)")
    sentences = list(_sample(texts, sample_bytes))
    if not sentences:
        raise DataError("no text to train the tokenizer on")
    sentences = _split_at_rare_characters(sentences, max_chars=(vocab_size - N_RESERVED) // 2)
    proto = _train(sentences, vocab_size, model_type)
    Path(f"{model_prefix}.model").write_bytes(proto)
    return Tokenizer(proto)


def text_chunks(text: str, max_bytes: int = SENTENCE_BYTES) -> Iterator[str]:
    """Splits text at line ends into pieces of at most max_bytes UTF-8 bytes; "".join gives text back."""
    step = max_bytes // 4  # a character takes at most 4 bytes, so step characters always fit
    lines = (piece for line in text.splitlines(keepends=True) for piece in
             ([line] if len(line) <= step else [line[i:i + step] for i in range(0, len(line), step)]))
    buf, size = [], 0
    for line in lines:
        n = len(line.encode())
        if size + n > max_bytes and buf:
            yield "".join(buf)
            buf, size = [], 0
        buf.append(line)
        size += n
    if buf:
        yield "".join(buf)


def _sample(texts: Iterable[str], sample_bytes: int) -> Iterator[str]:
    total = 0
    for text in texts:
        for chunk in text_chunks(text):
            yield chunk
            total += len(chunk.encode())
            if total >= sample_bytes:
                return


def _split_at_rare_characters(sentences: list[str], max_chars: int) -> list[str]:
    """Keeps at most max_chars distinct characters: the text is cut at rarer ones, left to byte fallback.

    sentencepiece insists on a piece per character covering >= 98% of the text, so a small vocabulary
    cannot hold a Chinese corpus's characters; cutting there (rather than deleting) invents no neighbours.
    """
    counts = collections.Counter()
    for s in sentences:
        counts.update(s)
    rare = {ord(c): "\x00" for c, _ in counts.most_common()[max_chars:]}
    if not rare and "\x00" not in counts:  # the trainer also refuses NUL characters
        return sentences
    return [piece for s in sentences for piece in s.translate(rare).split("\x00") if piece]


def _train(sentences: list[str], vocab_size: int, model_type: str) -> bytes:
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=True,
            character_coverage=CHARACTER_COVERAGE, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            control_symbols=list(SPECIAL_TOKENS), max_sentence_length=2 * SENTENCE_BYTES,
            num_threads=2, minloglevel=2)
    except RuntimeError as e:
        message = " ".join(str(e).split())
        fit = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message)
        if not fit or int(fit[1]) >= vocab_size:
            raise DataError(f"sentencepiece training failed: {message}") from None
        warnings.warn(f"tokenizer corpus too small for vocab_size={vocab_size}: trained {fit[1]} pieces instead",
                      stacklevel=3)
        return _train(sentences, int(fit[1]), model_type)
    return model.getvalue()


def from_bytes(data: bytes):
    """The tokenizer whose serialized() is `data`: a sentencepiece model, or a Hugging Face tokenizer.json."""
    return _from_json(data) if _is_json(data) else Tokenizer(data)


def _from_json(data: bytes, path: Path | None = None) -> PieceTable:
    """A tokenizer.json: WordPiece (BERT's) or byte-level BPE (GPT-2's, Qwen2's), by its model type."""
    try:
        kind = (json.loads(data).get("model") or {}).get("type")
    except ValueError as e:
        raise DataError(f"{path or 'tokenizer'}: not a tokenizer.json ({e})") from None
    return (WordPieceTokenizer if kind == "WordPiece" else ByteLevelBPETokenizer).from_json(data, path)


def _is_json(data: bytes) -> bool:
    return data.lstrip()[:1] == b"{"  # a sentencepiece ModelProto starts with field 1's tag, 0x0A
