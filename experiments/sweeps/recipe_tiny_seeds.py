"""Seeds 1 and 2 of the recipe_tiny points that came within 1% of the base at seed 0 and are candidates to
ship (the base, QK-norm, WSD, ReLU²), at the same 90 s budget: whether a 1% difference is a difference.

    llm-jax sweep recipe_tiny_seeds --set data.prepared=RECIPE_TINY_DIR/data/<the 2048-piece one>

(sharing recipe_tiny's prepared data and its cached compressor figures). Results: docs/recipe.md.
"""
from llm_jax.sweep.plan import Sweep

# The base as measured: the experiment before it shipped the winners (each point sets it, then its switch).
BEFORE = {"optim.optimizer": "adamw", "model.mlp": "swiglu", "model.d_ff": 384, "model.vocab_size": 2048}
CANDIDATES = ({}, {"model.qk_norm": True}, {"optim.schedule": "wsd"}, {"model.mlp": "relu2", "model.d_ff": 576})


def sweep() -> Sweep:
    return Sweep(base="pretrain_tiny", points=tuple({**BEFORE, **c, "train.seed": s} for s in (1, 2) for c in CANDIDATES),
                 overrides=("train.time_budget_s=90", "train.eval_every=100", "checkpoint.every=0"))
