"""The recipe ablations' sweeps (experiments/sweeps/recipe_*.py): one switch of the modern recipe per point, on
the base as it was measured, at a fixed wall-clock budget (train.time_budget_s: the step count and the schedule
are planned from the measured step rate, so a switch that makes steps slower pays for it in steps).

Where each switch comes from:
  optim.optimizer=muon        Muon (K. Jordan et al. 2024), the optimizer of the modded-nanogpt speed-run records
  model.qk_norm               QK-norm (Dehghani et al. 2023, ViT-22B; OLMo 2; modded-nanogpt)
  model.logit_softcap=30      tanh soft-capping of the output logits (Gemma 2; modded-nanogpt)
  train.z_loss=1e-4           the z-loss of PaLM (Chowdhery et al. 2022)
  optim.schedule=wsd          warmup-stable-decay (MiniCPM, Hu et al. 2024; Hägele et al. 2024)
  model.tie_embeddings        tied input and output embeddings (GPT-2), against untied (Llama)
  model.mlp=relu2             ReLU² MLP (Primer, So et al. 2021; modded-nanogpt), d_ff 576: SwiGLU's parameters
  train.seq_len_warmup_steps  short windows first (Li et al. 2022, sequence-length warmup)
  model.vocab_size            the tokenizer's vocabulary (1024, 2048 = the default, 4096)
The measured results are in docs/recipe.md.
"""
from __future__ import annotations

from llm_jax.sweep.plan import Sweep

# The base as measured: the experiments before they shipped the winners (each point sets it, then its switch),
# scored on the first 40 evaluation batches as then (all of Tiny Shakespeare's held-out split).
BEFORE = {"optim.optimizer": "adamw", "model.mlp": "swiglu", "model.d_ff": 384, "model.vocab_size": 2048,
          "train.eval_batches": 40}
RELU2 = {"model.mlp": "relu2", "model.d_ff": 576}
# The points within about 1% of the base at seed 0, run again at seeds 1 and 2: the candidates to ship, and the
# two that came out slightly worse (whether that is more than seed noise).
CANDIDATES = ({}, {"model.qk_norm": True}, {"optim.schedule": "wsd"}, RELU2)
SLIGHTLY_WORSE = ({"model.logit_softcap": 30.0}, {"train.z_loss": 1e-4})


def switches(seq_len_warmup_steps: int) -> tuple[dict, ...]:
    """The base ({}) and each switch alone."""
    return ({}, {"optim.optimizer": "muon"}, {"model.qk_norm": True}, {"model.logit_softcap": 30.0},
            {"train.z_loss": 1e-4}, {"optim.schedule": "wsd"}, {"model.tie_embeddings": True}, RELU2,
            {"train.seq_len_warmup_steps": seq_len_warmup_steps}, {"model.vocab_size": 1024},
            {"model.vocab_size": 4096})


def recipe_sweep(base: str, before: dict, budget_s: int, points: tuple[dict, ...], seeds: tuple[int, ...] = ()) -> Sweep:
    """A point per switch (per seed, if given) on `base` set back to `before`, each trained for budget_s seconds."""
    seeded = [{**p, "train.seed": s} for s in seeds for p in points] if seeds else list(points)
    return Sweep(base=base, points=tuple({**BEFORE, **before, **p} for p in seeded),
                 overrides=(f"train.time_budget_s={budget_s}", "train.eval_every=100", "checkpoint.every=0"))
