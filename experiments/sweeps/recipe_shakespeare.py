"""The modern recipe, one switch at a time, on Tiny Shakespeare (`pretrain_shakespeare` at its measured batch of
32) at 60 s of training each (the switches and their sources: llm_jax/sweep/recipe.py):

    llm-jax sweep recipe_shakespeare               # runs/sweeps/recipe_shakespeare/: one per point, ~15 minutes
    llm-jax report runs/sweeps/recipe_shakespeare  # report.md: bits/byte against wall-clock and FLOPs

The measured results are in docs/recipe.md.
"""
from llm_jax.sweep.recipe import recipe_sweep, switches


def sweep():
    return recipe_sweep("pretrain_shakespeare", {"train.batch_size": 32}, 60, switches(seq_len_warmup_steps=40))
