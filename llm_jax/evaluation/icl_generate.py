"""The generation kind of in-context evaluation (icl.py scores the rest): greedy answers, cut, extracted, matched.

Prompts are generated from greedily (temperature 0) with the KV-cache Generator, batch_size rows at a time
(padding rows fill the last batch) at prompt widths rounded up to a power of two, so each width compiles once.
Requests with the same stop strings share batches: a batch stops early once every row has produced EOS or a
token whose text holds one of its stop strings whole (the cut below is then where it would have been anyway);
otherwise it runs to max_gen_tokens. The answer is the decoded text up to the earliest stop string.

Extractors (EXTRACTORS, named by Request.extract) give a strict and a flexible answer, both normalised (",",
"$" and one trailing "." removed, whitespace stripped, as the harness's gsm8k filters); the reference answer is
normalised alike and matched exactly. gsm8k: strict is the first "#### <number>" (the harness's strict-match);
flexible is the strict answer when there is one, else the last number in the text (the harness's flexible-extract
takes the last number even after a "####" answer, and counts digit-less runs like ".." as numbers). acc is the
strict match, acc_flexible the flexible one.
"""
from __future__ import annotations

import re

from llm_jax.errors import ConfigError
from llm_jax.evaluation.requests import Request

MIN_PROMPT_WIDTH = 16
_STRICT = re.compile(r"#### (-?[0-9.,]+)")
_NUMBER = re.compile(r"-?[$0-9.,]{2,}|-?[0-9]+")  # the harness's flexible-extract pattern


def normalise(answer: str) -> str:
    answer = answer.replace(",", "").replace("$", "").strip()
    return answer[:-1] if answer.endswith(".") else answer


def gsm8k(text: str) -> tuple[str | None, str | None]:
    """(strict, flexible) answers of a GSM8K-style solution, normalised; None where nothing is found."""
    strict = _STRICT.search(text)
    numbers = [m for m in _NUMBER.findall(text) if any(c.isdigit() for c in m)]
    strict_answer = normalise(strict.group(1)) if strict else None
    return strict_answer, strict_answer if strict else (normalise(numbers[-1]) if numbers else None)


EXTRACTORS = {"gsm8k": gsm8k}


def check_extractors(reqs: list[Request]) -> None:
    unknown = {q.extract for q in reqs} - set(EXTRACTORS)
    if unknown:
        raise ConfigError(f"unknown answer extractors {sorted(unknown)}: known are {', '.join(EXTRACTORS)}")


def judge(req: Request, text: str) -> tuple[str | None, float, float]:
    """(the strict answer, its match, the flexible answer's match) of a generated text."""
    strict, flexible = EXTRACTORS[req.extract](text)
    gold = normalise(req.answer)
    return strict, float(strict == gold), float(flexible == gold)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """text before the earliest of the stop strings."""
    return text[:min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))]


def stop_tokens(tokenizer, stops: tuple[str, ...]) -> list[int]:
    """EOS and every token whose bytes hold a stop string whole: a row that made one has reached its cut."""
    needles = [s.encode() for s in stops if s]
    if not needles:
        return [tokenizer.eos_id]
    return [tokenizer.eos_id] + [i for i in range(tokenizer.vocab_size)
                                 if any(n in tokenizer.decode_bytes([i]) for n in needles)]


def generate_texts(runner, tokenizer, prompts: list[list[int]], stops: list[tuple[str, ...]], room: int,
                   batch_size: int, max_gen_tokens: int) -> list[str]:
    """Each prompt's greedy continuation, cut before the first of its stop strings (prompts of at most `room`
    ids)."""
    generator = runner.greedy
    rows, out = runner.round_rows(batch_size), [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (stops[i], -len(prompts[i])))
    stop_ids: dict[tuple[str, ...], list[int]] = {}
    start = 0
    while start < len(order):
        key = stops[order[start]]
        chunk = [i for i in order[start:start + rows] if stops[i] == key]
        ids = stop_ids.setdefault(key, stop_tokens(tokenizer, key))
        width = min(room, max(MIN_PROMPT_WIDTH, 1 << (len(prompts[chunk[0]]) - 1).bit_length()))
        padded = [prompts[i] for i in chunk] + [[tokenizer.eos_id]] * (rows - len(chunk))
        answers = generator.generate(padded, max_gen_tokens, stop_ids=ids, pad_id=tokenizer.pad_id,
                                     prompt_width=width)
        for i, answer in zip(chunk, answers):
            out[i] = cut_at_stop(tokenizer.decode(answer), key)
        start += len(chunk)
    return out
