"""Depth on CPU: pretrain_tiny at 1, 2, 4 and 6 layers, 300 steps each (13 minutes on 2 busy cores).

    llm-jax sweep layers_tiny                          # runs/sweeps/layers_tiny/: one run per depth
    llm-jax report runs/sweeps/layers_tiny             # report.md (written at the end of a local sweep too)
    tensorboard --logdir runs/sweeps/layers_tiny       # curves, and the HParams dashboard

All four train on the same 1.2M tokens (the corpus is tokenized once for the sweep) with the same schedule,
so the report shows what depth buys at a fixed number of tokens: final held-out bits per byte against depth
and against training FLOPs. At this budget it buys nothing yet: 1 layer ends at 1.993 bits/byte, 2 at
2.018, 4 at 2.036, 6 at 2.052, for 3.5e12 to 1.1e13 FLOPs; the deeper models start slower and are closing
the gap (4 layers vs 1: 0.16 bits/byte behind at step 60, 0.04 at step 300).
"""
from llm_jax.sweep.plan import Sweep


def sweep() -> Sweep:
    return Sweep(base="pretrain_tiny", grid={"model.n_layers": (1, 2, 4, 6)},
                 overrides=("train.time_budget_s=0", "train.steps=300", "train.eval_every=60", "train.eval_batches=20",
                            "checkpoint.every=100"))
