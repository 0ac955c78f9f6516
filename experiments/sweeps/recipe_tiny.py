"""The modern recipe, one switch at a time, on the embedded default (`pretrain_tiny`) at 90 s of training each
(the switches and their sources: llm_jax/sweep/recipe.py):

    llm-jax sweep recipe_tiny                      # runs/sweeps/recipe_tiny/: one run per point, ~25 minutes
    llm-jax report runs/sweeps/recipe_tiny         # report.md: bits/byte against wall-clock and FLOPs

The measured results are in docs/recipe.md.
"""
from llm_jax.sweep.recipe import recipe_sweep, switches


def sweep():
    return recipe_sweep("pretrain_tiny", {}, 90, switches(seq_len_warmup_steps=60))
