"""Depth and in-context skills: pretrain_en_small at 1, 2, 4 and 8 layers, 250 steps each (the same 1M tokens),
scored on BLiMP, PIQA and TruthfulQA MC2 (eval.tasks, the first 1,000 items each, 0-shot; PIQA and TruthfulQA
also 5-shot) at the end: does any benchmark rise above chance as the layers grow?

    llm-jax sweep layers_en_icl && llm-jax report runs/sweeps/layers_en_icl   # a column per benchmark and shots
"""
from llm_jax.sweep.plan import Sweep


def sweep() -> Sweep:
    return Sweep(base="pretrain_en_small", grid={"model.n_layers": (1, 2, 4, 8)},
                 overrides=("train.time_budget_s=0", "train.steps=250", "train.eval_every=250", "checkpoint.every=250",
                            "eval.tasks=blimp,piqa,truthfulqa_mc", "eval.shots=0,5", "eval.limit=1000"))
