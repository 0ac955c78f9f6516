"""What an in-context benchmark asks of a model: one Request per scored item, its solved exemplars already
rendered before the question. benchmarks.py makes them from the shared eval_* folders; icl.py scores them.

Kinds (each scored one way, whatever the benchmark):
  mc      multiple choice by log-likelihood: context = exemplars + question, each choice a continuation; acc
          picks the highest summed log-likelihood, acc_norm the highest per byte of the choice; gold = (i,)
  pairs   minimal pairs, zero-shot: no context (the first token is predicted after EOS), choices = the
          acceptable and the unacceptable sentence, each after the harness's " " target delimiter, gold = (0,);
          correct when the acceptable one is at least as likely (a tie counts as correct, as in the harness)
  mc2     several correct answers (TruthfulQA MC2): the probability mass of the gold choices, normalised over
          all choices; gold = the true choices' indices
  gen     generation: greedy from context until one of `stop` (or the token budget), then `extract` names the
          answer extractor, and exact match against `answer`
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("mc", "pairs", "mc2", "gen")


@dataclass(frozen=True)
class Request:
    kind: str  # one of KINDS
    exemplars: tuple[str, ...]  # the rendered solved examples, in order, each with its separator; () at 0-shot
    question: str  # the item's own prompt: the continuations (or the generation) follow it directly
    choices: tuple[str, ...] = ()  # mc, mc2, pairs: the continuations scored
    gold: tuple[int, ...] = ()  # mc: (index,); mc2: the true choices; pairs: (0,)
    answer: str = ""  # gen: the reference answer, already extracted
    stop: tuple[str, ...] = ()  # gen: generation stops before the first of these
    extract: str = ""  # gen: the answer extractor's name (icl.EXTRACTORS)
    group: str = ""  # the paradigm or subject, for per-group breakdowns

    @property
    def context(self) -> str:
        return "".join(self.exemplars) + self.question

    @property
    def chance(self) -> float:
        """The expected score of a uniform guess: 1/choices (mc, pairs), true/choices (mc2), 0 (gen)."""
        if self.kind == "gen":
            return 0.0
        return (len(self.gold) if self.kind == "mc2" else 1) / len(self.choices)
