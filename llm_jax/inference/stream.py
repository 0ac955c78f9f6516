"""`llm-jax sample` and `llm-jax chat`: text in, streamed text out, through the model's chat template for chat.

Tokens are printed as they are produced. Their bytes go through an incremental UTF-8 decoder, so a
character split over several byte-fallback tokens appears once it is complete. A sample prompt is encoded
with its special tokens parsed ("[CLS]今天" starts with [CLS]'s id); what is typed in a chat stays text.
"""
from __future__ import annotations

import codecs
import sys
from typing import TextIO

from llm_jax.data.chat.template import render_prompt, stop_ids
from llm_jax.data.chat.dialogue import Message
from llm_jax.data.tokenizer import Tokenizer
from llm_jax.errors import ConfigError
from llm_jax.inference.generate import Generator, check_sampling


class Detokenizer:
    """The text of one sequence as its tokens arrive: bytes decoded incrementally (a character split over several
    tokens comes out whole), stop tokens print nothing, and text that could be the start of a stop string is held
    back until it is not (the returned text never contains a stop string)."""

    def __init__(self, tokenizer, stop_ids, stops: tuple[str, ...]):
        self.tokenizer, self.stop_ids, self.stops = tokenizer, stop_ids, stops
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text, self.sent, self.stopped = "", 0, False

    def add(self, token: int | None) -> str:
        """The new text safe to send after `token` (None: the end, flush everything)."""
        if self.stopped:
            return ""
        if token is None:
            self.text += self.decoder.decode(b"", final=True)
        elif token not in self.stop_ids:
            self.text += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True
        end = len(self.text) if token is None or self.stopped else len(self.text) - self._held()
        delta, self.sent = self.text[self.sent:max(end, self.sent)], max(end, self.sent)
        return delta

    def _held(self) -> int:
        """How many trailing characters could begin a stop string."""
        return max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)


class TextStream:
    """Prints the tokens of one row as text as they arrive; stop tokens print nothing."""

    def __init__(self, tokenizer: Tokenizer, out: TextIO, stop_ids: set[int]):
        self.out, self.text = out, Detokenizer(tokenizer, stop_ids, ())

    def __call__(self, step_tokens: list[int | None]) -> None:
        if step_tokens[0] is not None:
            self.out.write(self.text.add(step_tokens[0]))
            self.out.flush()

    def close(self) -> None:
        self.out.write(self.text.add(None) + "\n")
        self.out.flush()


def answer_text(tokenizer, tokens: list[int], stops) -> str:
    """The text of an answer, without its stop tokens, stripped (as chat adds it to the dialogue)."""
    return tokenizer.decode([t for t in tokens if t not in stops]).strip()


def prompt_ids(generator: Generator, tokenizer: Tokenizer, prompt: str, max_tokens: int) -> list[int]:
    """The ids of a `sample` prompt, special tokens spelt in it parsed, checked with the sampling settings before
    anything is printed (generate() would raise after the prompt is)."""
    ids = tokenizer.encode_prompt(prompt)
    if not ids:
        raise ConfigError(f"prompt {prompt!r}: encodes to no tokens; generation needs at least 1")
    check_sampling(generator.sampling, max_tokens, model=generator.runner.cfg, name=str)
    return ids


def sample(generator: Generator, tokenizer: Tokenizer, prompt: str, max_tokens: int, seed: int,
           out: TextIO | None = None, stops: set[int] | None = None) -> list[int]:
    """Continues `prompt` as a document, streaming the continuation, until one of `stops` (default: EOS and the
    default template's end of a turn; the CLI passes the model's template's)."""
    out = out or sys.stdout  # looked up now: the stream may have been replaced since import
    ids = prompt_ids(generator, tokenizer, prompt, max_tokens)
    out.write(prompt)
    stops = stop_ids(tokenizer) if stops is None else stops
    stream = TextStream(tokenizer, out, stops)
    tokens = generator.generate([ids], max_tokens, seed=seed, stop_ids=sorted(stops), on_tokens=stream)[0]
    stream.close()
    return tokens


def chat(generator: Generator, tokenizer: Tokenizer, max_tokens: int, seed: int, system: str = "",
         inp: TextIO | None = None, out: TextIO | None = None, template: str = "") -> list[Message]:
    """A multi-turn conversation on the terminal through the chat `template`; the whole dialogue so far is the
    context of each answer. An empty line or end of input ends it."""
    inp, out = inp or sys.stdin, out or sys.stdout
    stops = stop_ids(tokenizer, template)
    dialogue = [Message("system", system)] if system else []
    turn = 0
    while True:
        out.write("you> ")
        out.flush()
        line = inp.readline()
        if not line.strip():
            out.write("\n")
            return dialogue
        dialogue.append(Message("user", line.strip()))
        out.write("model> ")
        stream = TextStream(tokenizer, out, stops)
        answer = generator.generate([render_prompt(dialogue, tokenizer, template).tolist()], max_tokens,
                                    seed=seed + turn, stop_ids=sorted(stops), on_tokens=stream)[0]
        text = answer_text(tokenizer, answer, stops)
        if not text:  # the template has no empty turns: drop the unanswered question from the context
            out.write("(no answer)")
            dialogue.pop()
        else:
            dialogue.append(Message("assistant", text))
        stream.close()
        turn += 1
