"""Arithmetic coding over integer frequencies (Witten, Neal & Cleary, with underflow handling), independent
of any model: the coder of codec.py, which feeds it a language model's next-token distributions.

Both sides must see identical integers: `quantise` turns float32 logits into cumulative frequencies with
plain numpy on the host, so encoder and decoder agree bit for bit.
"""
from __future__ import annotations

import numpy as np

# Frequencies sum to at most 2**24: room for a 32k-token vocabulary (every token needs at least 1) with
# little mass lost to the floor; the coder's 48-bit registers keep its range >= 2**46, far above the total.
TOTAL = 2**24
CODE_BITS = 48
_HALF, _QUARTER = 1 << (CODE_BITS - 1), 1 << (CODE_BITS - 2)
_MAX = (1 << CODE_BITS) - 1


def _narrow(low: int, high: int, cum_lo: int, cum_hi: int, total: int) -> tuple[int, int]:
    """The part of [low, high] that the symbol [cum_lo, cum_hi) of `total` owns (encoder and decoder alike)."""
    span = high - low + 1
    return low + span * cum_lo // total, low + span * cum_hi // total - 1


class Encoder:
    """Codes symbols given as [cum_lo, cum_hi) of an integer frequency total; finish() returns the bytes."""

    def __init__(self):
        self.low, self.high, self.pending, self.bits = 0, _MAX, 0, []

    def _emit(self, bit: int) -> None:
        self.bits.append(bit)
        self.bits.extend([1 - bit] * self.pending)
        self.pending = 0

    def encode(self, cum_lo: int, cum_hi: int, total: int) -> None:
        self.low, self.high = _narrow(self.low, self.high, cum_lo, cum_hi, total)
        while True:
            if self.high < _HALF:
                self._emit(0)
            elif self.low >= _HALF:
                self._emit(1)
                self.low -= _HALF
                self.high -= _HALF
            elif self.low >= _QUARTER and self.high < _HALF + _QUARTER:
                # The interval straddles the middle: the next bit is unknown, but is the opposite of the one after.
                self.pending += 1
                self.low -= _QUARTER
                self.high -= _QUARTER
            else:
                break
            self.low, self.high = 2 * self.low, 2 * self.high + 1

    def finish(self) -> bytes:
        # Two more bits pin a point inside [low, high]; the decoder reads missing bits as zeros.
        self.pending += 1
        self._emit(0 if self.low < _QUARTER else 1)
        return np.packbits(np.array(self.bits, np.uint8)).tobytes() if self.bits else b""


class Decoder:
    """Reads symbols back: target(total) gives a cumulative count to look up, consume() removes that symbol."""

    def __init__(self, payload: bytes):
        self.bits = np.unpackbits(np.frombuffer(payload, np.uint8)).tolist()
        self.next_bit, self.low, self.high, self.value = 0, 0, _MAX, 0
        for _ in range(CODE_BITS):
            self.value = 2 * self.value + self._read()

    def _read(self) -> int:
        bit = self.bits[self.next_bit] if self.next_bit < len(self.bits) else 0
        self.next_bit += 1
        return bit

    def target(self, total: int) -> int:
        return ((self.value - self.low + 1) * total - 1) // (self.high - self.low + 1)

    def consume(self, cum_lo: int, cum_hi: int, total: int) -> None:
        self.low, self.high = _narrow(self.low, self.high, cum_lo, cum_hi, total)
        while True:
            if self.high < _HALF:
                pass
            elif self.low >= _HALF:
                self.low, self.high, self.value = self.low - _HALF, self.high - _HALF, self.value - _HALF
            elif self.low >= _QUARTER and self.high < _HALF + _QUARTER:
                self.low, self.high, self.value = self.low - _QUARTER, self.high - _QUARTER, self.value - _QUARTER
            else:
                break
            self.low, self.high = 2 * self.low, 2 * self.high + 1
            self.value = 2 * self.value + self._read()

    def overrun(self) -> int:
        """Bits read past the end of the payload (zeros); a valid stream needs at most CODE_BITS of them."""
        return max(0, self.next_bit - len(self.bits))


def decode_symbol(decoder: Decoder, cum_V1: np.ndarray) -> int:
    """The symbol whose [cum[s], cum[s+1]) holds the decoder's target, consumed."""
    total = int(cum_V1[-1])
    symbol = int(np.searchsorted(cum_V1, decoder.target(total), side="right")) - 1
    decoder.consume(int(cum_V1[symbol]), int(cum_V1[symbol + 1]), total)
    return symbol


def quantise(logits_V: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 probabilities and int64 cumulative frequencies (V + 1, from 0) of float32 logits.

    freq = 1 + floor(p * (TOTAL - V)): never zero, sums to at most TOTAL. Plain numpy on the host, so both
    sides compute identical integers from identical logits.
    """
    z_V = logits_V.astype(np.float64)
    p_V = np.exp(z_V - z_V.max())
    p_V /= p_V.sum()
    freq_V = 1 + np.floor(p_V * (TOTAL - len(p_V))).astype(np.int64)
    return p_V, np.concatenate([np.zeros(1, np.int64), np.cumsum(freq_V)])
