"""Seeds 1 and 2 of the recipe_tiny points that came within about 1% of the base at seed 0 (the base and the
candidates to ship: QK-norm, WSD, ReLU²; soft-capping and the z-loss, slightly worse), at the same 90 s budget:
whether a 1% difference is a difference.

    llm-jax sweep recipe_tiny_seeds --set data.prepared=RECIPE_TINY_DIR/data/<the 2048-piece one>

(sharing recipe_tiny's prepared data and its cached compressor figures). Results: docs/recipe.md.
"""
from llm_jax.sweep.recipe import CANDIDATES, SLIGHTLY_WORSE, recipe_sweep


def sweep():
    return recipe_sweep("pretrain_tiny", {}, 90, CANDIDATES + SLIGHTLY_WORSE, seeds=(1, 2))
