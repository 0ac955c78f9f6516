"""GSM8K: grade-school maths word problems, answered by generation, English.

Format: lm-evaluation-harness `gsm8k` (harness commit 4e7e0d47f33b): each exemplar is
`Question: {question}\nAnswer: {answer}\n\n` with the full worked solution from train.jsonl.gz (calculator
annotations <<...>> and the final `#### N` line included, as the harness shows them), then the test question as
`Question: {question}\nAnswer:`; greedy generation stops at "Question:", "</s>" or "<|im_end|>". All 1,319 test
problems are scored; exemplars come only from train. The reference answer is the number after `####` with ","
and "$" removed and a trailing "." dropped (the harness's regexes_to_ignore); the scorer's "gsm8k" extractor
tries the strict `#### N` match, then the last number of the output (the harness's flexible-extract).
Each test problem draws its own exemplars from train, seeded by (seed, problem index) (the harness also samples
per problem, from one seeded stream). The harness's default is 5 shots.
"""
from __future__ import annotations

from pathlib import Path

from llm_jax.errors import DataError
from llm_jax.evaluation.benchmarks.common import check_shots, draw, string_fields
from llm_jax.evaluation.requests import Request

STOP = ("Question:", "</s>", "<|im_end|>")
DESCRIBE = {"gsm8k": "gen: all 1,319 test problems scored, exemplars drawn from train (7,473); "
                     "lm-evaluation-harness gsm8k format (strict then flexible extraction); English"}


def final_answer(solution: str, where: str) -> str:
    """The number after `####`, normalised as the harness compares it."""
    if "####" not in solution:
        raise DataError(f"{where}: no '#### <number>' line in the answer")
    return solution.split("####")[-1].strip().replace(",", "").replace("$", "").removesuffix(".")


def build(name: str, folder: Path, shots: int, seed: int) -> list[Request]:
    fields = ("question", "answer")
    pool = []
    if shots:
        pool = [f"Question: {q}\nAnswer: {a}\n\n" for _, (q, a) in string_fields(folder / "train.jsonl.gz", fields)]
        check_shots(name, shots, len(pool), "train.jsonl.gz")
    return [Request("gen", draw(pool, shots, seed, i), f"Question: {q}\nAnswer:", answer=final_answer(a, where),
                    stop=STOP, extract="gsm8k")
            for i, (where, (q, a)) in enumerate(string_fields(folder / "test.jsonl", fields))]
