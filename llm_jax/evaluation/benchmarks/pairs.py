"""BLiMP (English) and SLING (Mandarin): minimal pairs, zero-shot, all paradigms pooled.

Format: lm-evaluation-harness `blimp_<UID>` (harness commit 4e7e0d47f33b): an empty context and the choices
" " + sentence_good, " " + sentence_bad (the harness puts its target delimiter " " before every choice, also
after an empty context; the scorer conditions the first token on the start of text), gold 0, scored by total
log-likelihood. A tie counts as correct, as in the harness (its argmax takes the first): BLiMP keeps its 7 pairs
with identical sentences, SLING its 24, and they score as correct for every model.
SLING has no harness task; it is scored the BLiMP way (total log-likelihood, higher wins), not by the SLING
paper's default of perplexity (mean per-token loss), which differs when the two sentences differ in length.
Items are ordered round-robin over the paradigms (files in path order, pairs in file order), so `limit` takes
the first pairs of every paradigm; the group is the paradigm, the file's path below the folder without
.jsonl.gz (BLiMP: its UID; SLING: Phenomenon/[Plural/]paradigm). The reported accuracy is the mean over pairs,
which equals the harness's mean over paradigms as every paradigm has 1,000 pairs.
"""
from __future__ import annotations

from pathlib import Path

from llm_jax.errors import ConfigError
from llm_jax.evaluation.benchmarks.common import files, interleave, string_fields
from llm_jax.evaluation.requests import Request

DESCRIBE = {
    "blimp": "pairs: 67 paradigms x 1,000 minimal pairs pooled, zero-shot only; lm-evaluation-harness blimp "
             "format; English",
    "sling": "pairs: 40 paradigms x 1,000 minimal pairs pooled, zero-shot only; scored as harness blimp "
             "(total log-likelihood, not the paper's perplexity); Mandarin Chinese",
}
SUFFIX = ".jsonl.gz"


def build(name: str, folder: Path, shots: int, seed: int) -> list[Request]:
    if shots:
        raise ConfigError(f"{name} is zero-shot only (minimal pairs have no exemplars): use 0 shots, not {shots}")
    groups = []
    for path in files(folder, f"*{SUFFIX}"):
        paradigm = path.relative_to(folder).as_posix().removesuffix(SUFFIX)
        groups.append([Request("pairs", (), "", (" " + good, " " + bad), (0,), group=paradigm)
                       for _, (good, bad) in string_fields(path, ("sentence_good", "sentence_bad"))])
    return interleave(groups)
