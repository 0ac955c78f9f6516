"""Training FLOPs per token of a model: the reference for MFU (`perf/mfu`, `bench`) and for the training
FLOPs of a sweep's report.

    flops_per_token = 6·N + 6·n_layers·n_heads·head_dim·T

N counts the matmul parameters, from the config rather than the parameter tree:

    N = n_layers·(d·H·hd            q projection
                  + 2·d·KV·hd       k and v projections
                  + H·hd·d          output projection
                  + m·d·ff)         MLP: m = 3 for SwiGLU (gate, up, down), 2 for GELU (up, down)
        + V·d                       unembedding, counted once even when tied to the input embedding
                                    (0 for a reward model: its head reads one token per sequence)

with d = d_model, H = n_heads, KV = n_kv_heads, hd = resolved_head_dim, ff = d_ff, V = vocab_size,
T = seq_len. 6·N is 2 FLOPs per multiply-add for the forward pass and twice that for the backward
pass: half of it the gradient of the activations, half that of the weights. With frozen weights
(parameter-efficient fine-tuning: peft.*) the weights' half is not computed, 4·N; the adapters' own
products (rank r ≪ d) are left out. Left out: the input embedding and the learned position table (gathers, not matmuls), norm
scales and biases (O(d) per token each, negligible), softmax, activations and the loss.

The attention term: per token and layer the forward pass spends 2·T·H·hd FLOPs on QKᵀ and as much on
the weighted sum of V, 4·T·H·hd in all; the causal mask halves the keys attended on average, and the
backward pass doubles the forward, giving 3·(4·T·H·hd)/2 = 6·T·H·hd. It counts H query heads: grouped
KV heads shrink the projections but not these products. No remat recomputation is counted: this is
model FLOPs, so MFU measures useful work, not hardware utilisation.
"""
from __future__ import annotations

from llm_jax.config import ModelConfig


def matmul_params(model: ModelConfig, unembed: bool = True) -> int:
    """N of the module docstring; `unembed`: the model ends in the output layer over the vocabulary."""
    d, hd = model.d_model, model.resolved_head_dim
    attention = d * model.n_heads * hd + 2 * d * model.n_kv_heads * hd + model.n_heads * hd * d
    mlp = (3 if model.mlp == "swiglu" else 2) * d * model.d_ff
    return model.n_layers * (attention + mlp) + (model.vocab_size * d if unembed else 0)


def flops_per_token(model: ModelConfig, seq_len: int, unembed: bool = True, frozen: bool = False) -> float:
    """Training (forward + backward) FLOPs per token, the weights `frozen` or not; see the module docstring."""
    attention = 6 * model.n_layers * model.n_heads * model.resolved_head_dim * seq_len
    return float((4 if frozen else 6) * matmul_params(model, unembed) + attention)


def forward_flops_per_token(model: ModelConfig, seq_len: int, unembed: bool = True) -> float:
    """One forward pass's FLOPs per token (a frozen model read by the step: DPO's reference): a third of the
    training FLOPs with trained weights."""
    return flops_per_token(model, seq_len, unembed) / 3
