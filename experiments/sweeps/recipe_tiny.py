"""The modern recipe, one switch at a time, on the embedded default at a fixed wall-clock budget.

Each point is `pretrain_tiny` with one switch changed, trained for the same 90 s of training time
(train.time_budget_s: the step count and the schedule are planned from the measured step rate, so a switch
that makes steps slower pays for it in steps):

    llm-jax sweep recipe_tiny                      # runs/sweeps/recipe_tiny/: one run per point, ~25 minutes
    llm-jax report runs/sweeps/recipe_tiny         # report.md: bits/byte against wall-clock and FLOPs

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
from llm_jax.sweep.plan import Sweep

# The base as measured: the experiment before it shipped the winners (each point sets it, then its switch).
BEFORE = {"optim.optimizer": "adamw", "model.mlp": "swiglu", "model.d_ff": 384, "model.vocab_size": 2048}
SWITCHES = ({}, {"optim.optimizer": "muon"}, {"model.qk_norm": True}, {"model.logit_softcap": 30.0},
            {"train.z_loss": 1e-4}, {"optim.schedule": "wsd"}, {"model.tie_embeddings": True},
            {"model.mlp": "relu2", "model.d_ff": 576}, {"train.seq_len_warmup_steps": 60},
            {"model.vocab_size": 1024}, {"model.vocab_size": 4096})


def sweep() -> Sweep:
    return Sweep(base="pretrain_tiny", points=tuple({**BEFORE, **switch} for switch in SWITCHES),
                 overrides=("train.time_budget_s=90", "train.eval_every=100", "checkpoint.every=0"))
