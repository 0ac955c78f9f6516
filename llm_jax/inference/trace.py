"""`llm-jax sample --trace`: each generated token with the model's probability of it and its top alternatives.

The probabilities are the model's next-token distribution at each step: softmax of the raw logits (temperature
1, before top-k and top-p), what the model believes whatever the sampling settings then do with it. Greedy
(temperature 0) picks the most probable token, the first alternative; with temperature > 0 the token is drawn
as it is without --trace (the same seed gives the same tokens), and may be one the model thought unlikely.

Plain text: a line per step as it is generated, e.g.

    step  3  id  121  ' sat'     p=0.412   top: ' sat' 0.412 | ' sees' 0.101 | ...

with each token's text as a Python repr, so spaces and newlines show; a special token shows by its name
([SEP]), and a byte-fallback piece that is only part of a UTF-8 character as its bytes (b'\\xe7'). JSON: one
document, {"prompt", "prompt_ids", "steps": [{"step", "id", "text", "prob", "logprob", "top": [{"id", "text",
"prob"}, ...]}, ...], "text"}, each token's "text" decoded with errors="replace" (U+FFFD for a partial
character); the document's "text" decodes the continuation as a whole (stop token left out), so the characters
split over tokens are whole there. The prompt is encoded as `llm-jax sample` encodes it (special tokens spelt in
it become their ids), and the same stop tokens end it (none with --ignore-eos): a stop token is the trace's last
step (marked "(stop)" in the plain lines).
"""
from __future__ import annotations

import json
import math
import sys
from typing import TextIO

from llm_jax.data.tokenizer import Tokenizer
from llm_jax.data.chat.template import stop_ids
from llm_jax.inference.generate import Generator, StepTrace
from llm_jax.inference.stream import prompt_ids


def shown(tokenizer: Tokenizer, token: int, names: dict[int, str]) -> str:
    """A token's text as the plain lines show it: a special token's name ([SEP], from `names`: id -> name), else
    its repr, or its bytes' if they are not UTF-8 on their own."""
    if token in names or token >= tokenizer.vocab_size:
        return names.get(token, "<no token>")  # the model's table may be larger than the tokenizer's
    data = tokenizer.decode_bytes([token])
    try:
        return repr(data.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(data)


def _p(prob: float) -> str:
    return f"{prob:.3f}" if prob >= 1e-3 else f"{prob:.1e}"


class Tracer:
    """Generator.generate's on_trace for one prompt: keeps each step's record (as the JSON has it) and, when
    `out` is given, prints its line as it arrives."""

    def __init__(self, tokenizer: Tokenizer, stops: set[int], max_tokens: int, vocab_size: int,
                 out: TextIO | None = None):
        self.tokenizer, self.stops, self.out = tokenizer, stops, out
        self.names = {i: name for name, i in tokenizer.specials.items()}
        self.widths = len(str(max_tokens)), len(str(vocab_size - 1))
        self.steps: list[dict] = []

    def __call__(self, step_tokens: list[int | None], trace: StepTrace) -> None:
        token = step_tokens[0]
        if token is None:
            return
        logprob = float(trace.logprob_B[0])
        def text(ids: list[int]) -> str:
            return self.tokenizer.decode([i for i in ids if i < self.tokenizer.vocab_size])

        top = [{"id": int(i), "text": text([int(i)]), "prob": math.exp(float(lp))}
               for i, lp in zip(trace.top_ids_BxK[0], trace.top_logprobs_BxK[0])]
        self.steps.append({"step": len(self.steps) + 1, "id": token, "text": text([token]),
                           "prob": math.exp(logprob), "logprob": logprob, "top": top})
        if self.out is not None:
            self.out.write(self.line(self.steps[-1]) + "\n")
            self.out.flush()

    def line(self, step: dict) -> str:
        w_step, w_id = self.widths
        top = " | ".join(f"{shown(self.tokenizer, t['id'], self.names)} {_p(t['prob'])}" for t in step["top"])
        stop = "  (stop)" if step["id"] in self.stops else ""
        return (f"step {step['step']:>{w_step}}  id {step['id']:>{w_id}}  {shown(self.tokenizer, step['id'], self.names):<8}  "
                f"p={_p(step['prob'])}   top: {top}{stop}")


def trace_sample(generator: Generator, tokenizer: Tokenizer, prompt: str, max_tokens: int, seed: int,
                 as_json: bool = False, out: TextIO | None = None, stops: set[int] | None = None) -> dict:
    """Continues `prompt` as `llm-jax sample` does with a Generator made with trace > 0, printing the trace
    (the plain lines as they come, or the JSON document at the end), until one of `stops` (default: EOS and the
    end of a turn). Returns the JSON document."""
    out = out or sys.stdout  # looked up now: the stream may have been replaced since import
    ids = prompt_ids(generator, tokenizer, prompt, max_tokens)  # as stream.sample: so the same tokens
    stops = stop_ids(tokenizer) if stops is None else stops
    if not as_json:
        out.write(f"prompt {prompt!r} ({len(ids)} tokens)\n")
    tracer = Tracer(tokenizer, stops, max_tokens, generator.runner.cfg.vocab_size, None if as_json else out)
    tokens = generator.generate([ids], max_tokens, seed=seed, stop_ids=sorted(stops), on_trace=tracer)[0]
    doc = {"prompt": prompt, "prompt_ids": ids, "steps": tracer.steps,
           "text": tokenizer.decode([t for t in tokens if t not in stops])}
    out.write((json.dumps(doc) if as_json else f"text {doc['text']!r}") + "\n")
    out.flush()
    return doc
