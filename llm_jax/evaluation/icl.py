"""In-context evaluation: score Requests (requests.py) with a model, through its ModelRunner.

Log-likelihood kinds (mc, pairs, mc2): every choice of every request is one row, context + continuation, and
its score is the summed log-likelihood of exactly the continuation's tokens, from the training objective's
per-token nats (tasks.losses.next_token_nats, so model.logits_chunk applies). Rows are sorted longest first and
batched at widths rounded up to a power of two (at least MIN_WIDTH, at most the context), so each width
compiles once; a batch holds `batch_size` rows of the full context's tokens, more rows when they are narrower.
The tokenization boundary is lm-evaluation-harness's (_encode_pair): whitespace ending the context moves to
the start of the continuation, and the continuation's tokens are encode(context + continuation) after the first
len(encode(context)); a context that encodes to nothing (pairs) is a single EOS, as the harness conditions on
its end-of-text token. As in the harness, the model reads at most `context` tokens (all but the continuation's
last), so a row holds at most context + 1 ids.
Too long: a request's context is cut from the left to fit its longest choice, the same cut for every choice
(so they are compared on the same context), which drops the exemplars' first tokens (counted in `truncated`)
and, when the question and the longest continuation alone do not fit, the question's first tokens (counted in
`question_truncated`); a continuation is never cut: a request with a choice longer than the whole context is
not scored, and counted in `skipped`.
Scores per item: mc acc is 1 when the gold choice has the highest summed log-likelihood (the first maximum
on ties, as numpy's argmax), acc_norm the same per UTF-8 byte of the choice's text (the harness divides by
characters); pairs acc is 1 when the acceptable sentence (choice 0) is at least as likely; mc2 acc is the
probability mass of the gold choices renormalised over all choices; gen: see icl_generate.py. A benchmark's
acc is the mean over items and stderr the standard error of that mean (sample std, ddof=1, over sqrt(n)), as
the harness's mean_stderr.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from llm_jax.data.batches import answer_rows
from llm_jax.errors import ConfigError
from llm_jax.evaluation import icl_generate
from llm_jax.evaluation.requests import KINDS, Request
from llm_jax.inference.runner import ModelRunner

MIN_WIDTH = 16
EXTRACTORS = icl_generate.EXTRACTORS


@dataclass(frozen=True)
class Result:
    """One request's outcome."""
    acc: float  # 0/1, or mc2's gold mass
    loglik: tuple[float, ...] = ()  # per choice: summed log-likelihood of its tokens (log-likelihood kinds)
    acc_norm: float | None = None  # mc: per-byte argmax hit
    acc_flexible: float | None = None  # gen: the flexible extraction's match
    text: str = ""  # gen: the generation, cut before its first stop string
    extracted: str | None = None  # gen: the strict extraction (None: nothing found)
    truncated: bool = False  # exemplar tokens were cut to fit the context
    question_truncated: bool = False  # question tokens were cut too


@dataclass
class Scores:
    requests: list[Request]  # the scored ones
    results: list[Result] = field(default_factory=list)
    skipped: int = 0  # requests with a choice longer than the context: not scored

    def metrics(self) -> dict:
        """acc, stderr, n, chance (means over items), truncated and question_truncated (counts); acc_norm when
        every request is mc, acc_flexible when every one is gen; groups {group: acc} when requests have groups."""
        acc = np.array([r.acc for r in self.results], np.float64)
        out = {"acc": float(acc.mean()) if len(acc) else math.nan, "stderr": stderr(acc), "n": len(acc),
               "chance": float(np.mean([q.chance for q in self.requests])) if len(acc) else math.nan,
               "skipped": self.skipped,
               "truncated": sum(r.truncated for r in self.results),
               "question_truncated": sum(r.question_truncated for r in self.results)}
        for key, kind in (("acc_norm", "mc"), ("acc_flexible", "gen")):
            if all(q.kind == kind for q in self.requests):
                out[key] = float(np.mean([getattr(r, key) for r in self.results]))
        groups: dict[str, list[float]] = {}
        for q, r in zip(self.requests, self.results):
            if q.group:
                groups.setdefault(q.group, []).append(r.acc)
        if groups:
            out["groups"] = {g: float(np.mean(v)) for g, v in sorted(groups.items())}
        return out


def stderr(scores: np.ndarray) -> float:
    """The standard error of the mean of per-item scores (NaN for fewer than 2 items: undefined)."""
    return float(scores.std(ddof=1) / math.sqrt(len(scores))) if len(scores) > 1 else math.nan


def score(runner: ModelRunner, tokenizer, reqs: list[Request], context: int, batch_size: int = 32,
          max_gen_tokens: int = 256) -> Scores:
    """Every request scored by its kind (see the module docstring), with at most `context` tokens per row."""
    if not reqs:
        raise ConfigError("no requests to score")
    unknown = {q.kind for q in reqs} - set(KINDS)
    if unknown:
        raise ConfigError(f"unknown request kinds {sorted(unknown)}: known are {', '.join(KINDS)}")
    runner.check_length(context, "context")
    gen = [i for i, q in enumerate(reqs) if q.kind == "gen"]
    other = [i for i, q in enumerate(reqs) if q.kind != "gen"]
    results: list[Result | None] = [None] * len(reqs)
    if other:
        for i, r in zip(other, score_loglik(runner, tokenizer, [reqs[i] for i in other], context, batch_size)):
            results[i] = r
    if gen:
        for i, r in zip(gen, score_generation(runner, tokenizer, [reqs[i] for i in gen], context, batch_size,
                                              max_gen_tokens)):
            results[i] = r
    kept = [(q, r) for q, r in zip(reqs, results) if r is not None]
    return Scores([q for q, _ in kept], [r for _, r in kept], skipped=len(reqs) - len(kept))


# --- the rows: tokens of each context and continuation ---------------------------------------------------

@dataclass(frozen=True)
class Encoded:
    context: list[int]  # the conditioning ids, cut to fit
    continuations: list[list[int]]  # per choice
    truncated: bool = False
    question_truncated: bool = False


def encode_requests(tokenizer, reqs: list[Request], context: int) -> list[Encoded | None]:
    """Each request's context and continuation ids, the boundary as the harness draws it, cut to fit; None
    for a request with a choice longer than the context."""
    heads, texts = [], []
    for q in reqs:
        heads.append(q.context.rstrip())
        texts += [heads[-1], *(q.context + choice for choice in q.choices)]
    ids, out = iter(tokenizer.encode_batch(texts)), []
    for q, head in zip(reqs, heads):
        ctx_ids = next(ids)
        conts = [whole[len(ctx_ids):] for whole in (next(ids) for _ in q.choices)]
        longest = max(map(len, conts))
        if longest > context:
            out.append(None)
            continue
        out.append(fit(tokenizer, q, head, ctx_ids or [tokenizer.eos_id], context + 1 - longest, conts))
    return out


def fit(tokenizer, req: Request, head: str, ctx_ids: list[int], room: int, conts=()) -> Encoded:
    """ctx_ids (the ids of `head`, the request's context) cut from the left to `room` ids, counting whether
    exemplar and question tokens went. The question's share is its own encoding's length (its tokens may
    merge with the exemplars' at the boundary: then the count is off by one, the cut is not)."""
    if len(ctx_ids) <= room:
        return Encoded(ctx_ids, list(conts))
    question = head[len("".join(req.exemplars)):]
    n_question = len(tokenizer.encode(question)) if question else 0
    return Encoded(ctx_ids[-room:], list(conts), truncated=bool(req.exemplars) and len(ctx_ids) > n_question,
                   question_truncated=room < n_question)


def width_of(tokens: int, context: int) -> int:
    """The row width (model inputs) for a row of `tokens` ids: its inputs rounded up to a power of two."""
    return min(context, max(MIN_WIDTH, 1 << max(tokens - 2, 0).bit_length()))


# --- log-likelihood kinds ---------------------------------------------------------------------------------

def loglikelihoods(runner: ModelRunner, rows: list[tuple[list[int], list[int]]], pad_id: int, context: int,
                   batch_size: int) -> np.ndarray:
    """Summed log-likelihood of each row's continuation after its context, batched by width (module doc)."""
    order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
    out, start, base_rows = np.zeros(len(rows), np.float64), 0, runner.round_rows(batch_size)
    while start < len(order):
        first = rows[order[start]]
        width = width_of(len(first[0]) + len(first[1]), context)
        n_rows = base_rows * max(1, context // width)  # the same tokens per batch whatever the width
        chunk = order[start:start + n_rows]
        batch = answer_rows([np.asarray(rows[i][0], np.int32) for i in chunk], [rows[i][1] for i in chunk], width,
                            pad_id, n_rows=n_rows)
        out[chunk] = -np.asarray(runner.summed_nats(runner.params, batch), np.float64)[:len(chunk)]
        start += len(chunk)
    return out


def score_loglik(runner: ModelRunner, tokenizer, reqs: list[Request], context: int,
                 batch_size: int) -> list[Result | None]:
    encoded = encode_requests(tokenizer, reqs, context)
    rows = [(e.context, cont) for e in encoded if e is not None for cont in e.continuations]
    flat, results, start = loglikelihoods(runner, rows, tokenizer.pad_id, context, batch_size), [], 0
    for q, e in zip(reqs, encoded):
        if e is None:
            results.append(None)
            continue
        ll = flat[start:start + len(q.choices)]
        start += len(q.choices)
        results.append(Result(acc=item_score(q, ll), loglik=tuple(map(float, ll)), acc_norm=norm_score(q, ll),
                              truncated=e.truncated, question_truncated=e.question_truncated))
    return results


def item_score(req: Request, ll: np.ndarray) -> float:
    if req.kind == "mc2":
        p = np.exp(ll - ll.max())
        return float(p[list(req.gold)].sum() / p.sum())
    return float(int(np.argmax(ll)) == req.gold[0])


def norm_score(req: Request, ll: np.ndarray) -> float | None:
    if req.kind != "mc":
        return None
    per_byte = ll / np.array([max(1, len(c.encode("utf-8"))) for c in req.choices], np.float64)
    return float(int(np.argmax(per_byte)) == req.gold[0])


# --- generation ---------------------------------------------------------------------------------------------

def score_generation(runner: ModelRunner, tokenizer, reqs: list[Request], context: int, batch_size: int,
                     max_gen_tokens: int) -> list[Result]:
    """Greedy answers to prompts cut to leave room for max_gen_tokens, cut at the stop, extracted and matched."""
    icl_generate.check_extractors(reqs)
    room = context - max_gen_tokens
    if room < 1:
        raise ConfigError(f"max_gen_tokens={max_gen_tokens} leaves no room for a prompt in the {context}-token "
                          "context")
    prompts = [fit(tokenizer, q, q.context, ids or [tokenizer.eos_id], room)
               for q, ids in zip(reqs, tokenizer.encode_batch([q.context for q in reqs]))]
    texts = icl_generate.generate_texts(runner, tokenizer, [p.context for p in prompts], [q.stop for q in reqs],
                                        room, batch_size, max_gen_tokens)
    results = []
    for q, p, text in zip(reqs, prompts, texts):
        strict, acc, acc_flexible = icl_generate.judge(q, text)
        results.append(Result(acc=acc, acc_flexible=acc_flexible, text=text, extracted=strict, truncated=p.truncated,
                              question_truncated=p.question_truncated))
    return results
