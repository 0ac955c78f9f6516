"""The in-context benchmarks of the shared eval_* folders, as Requests (evaluation/requests.py) for icl.py to
score. Each family's module docstring gives its exact prompt format and where it differs from
lm-evaluation-harness (commit 4e7e0d47f33b); `notes(name)` returns that text for the README.

Policy for all of them:
- Exemplars never come from the scored split: GSM8K's from train, CMMLU's from dev, TruthfulQA's from the
  harness's fixed QA prompt, PIQA's from the last 100 lines of valid, which are then not scored. BLiMP and SLING
  are zero-shot only.
- Where exemplars are drawn (GSM8K, PIQA), each scored item draws its own, by random.Random("{seed}:{index}"):
  the same prompts for every model, for every limit, and on every machine (string seeds do not depend on
  PYTHONHASHSEED). Where the harness takes them in order (CMMLU, TruthfulQA), the seed plays no part.
- An exemplar ends with the harness's few-shot delimiter "\n\n" and a choice starts with its target delimiter
  " "; the context is "".join(exemplars) + question.
- `limit` keeps the first N scored items: file order, or round-robin over the paradigms or subjects of a pooled
  benchmark (BLiMP, SLING, CMMLU), so that N items cover every group.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

from llm_jax.atomic import write_atomic
from llm_jax.errors import ConfigError
from llm_jax.evaluation.benchmarks import cmmlu, gsm8k, pairs, piqa, truthfulqa
from llm_jax.evaluation.requests import Request

TASKS = ("blimp", "sling", "truthfulqa_mc", "gsm8k", "cmmlu", "piqa")
ZERO_SHOT_ONLY = ("blimp", "sling")  # minimal pairs: any other shot count is refused
_FAMILIES = {"blimp": pairs, "sling": pairs, "truthfulqa_mc": truthfulqa, "gsm8k": gsm8k, "cmmlu": cmmlu,
             "piqa": piqa}


def _family(name: str):
    if name not in _FAMILIES:
        raise ConfigError(f"unknown benchmark {name!r}; known: {', '.join(TASKS)}")
    return _FAMILIES[name]


def describe(name: str) -> str:
    """One line: kind, split scored, exemplar pool, prompt format, language."""
    return _family(name).DESCRIBE[name]


def notes(name: str) -> str:
    """The benchmark's prompt format and where it differs from the harness, in full (its module's docstring)."""
    return inspect.cleandoc(_family(name).__doc__)


def requests(name: str, root: Path, shots: int, seed: int = 1234, limit: int | None = None) -> list[Request]:
    """One Request per scored item of benchmark `name`, read from root/eval_<name>/, with `shots` exemplars
    each; the first `limit` items only when given."""
    family = _family(name)
    if shots < 0:
        raise ConfigError(f"{name}: shots must be 0 or more, not {shots}")
    if limit is not None and limit < 1:
        raise ConfigError(f"{name}: limit must be 1 or more (or none), not {limit}")
    return family.build(name, Path(root) / f"eval_{name}", shots, seed)[:limit]


def write_prompts(reqs: list[Request], path: Path) -> None:
    """One JSON line per request (context, choices, gold, answer, group): the exact prompts scored."""
    lines = (json.dumps({"context": r.context, "choices": list(r.choices), "gold": list(r.gold), "answer": r.answer,
                         "group": r.group}, ensure_ascii=False) + "\n" for r in reqs)
    write_atomic(path, "".join(lines))
