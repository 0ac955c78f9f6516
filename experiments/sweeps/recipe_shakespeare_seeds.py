"""Seeds 1 and 2 of the base and of the embedded default's candidates to ship (QK-norm, WSD, ReLU²; on Tiny
Shakespeare at seed 0 they were 1.8%, 1.3% and 11.9% better than the base), at the same 60 s budget. Not run
yet: the Shakespeare ablation in docs/recipe.md is one seed.

    llm-jax sweep recipe_shakespeare_seeds --set data.prepared=RECIPE_SHAKESPEARE_DIR/data/<its prepared directory>

(sharing recipe_shakespeare's prepared data and its cached compressor figures). Results: docs/recipe.md.
"""
from llm_jax.sweep.recipe import CANDIDATES, recipe_sweep


def sweep():
    return recipe_sweep("pretrain_shakespeare", {"train.batch_size": 32}, 60, CANDIDATES, seeds=(1, 2))
