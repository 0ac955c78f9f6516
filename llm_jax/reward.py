"""The pairwise reward-model objective: Bradley-Terry on chosen vs rejected answers to the same prompt.

P(chosen preferred) = sigmoid(r_chosen - r_rejected), so the loss of a pair is
    -log sigmoid(r_chosen - r_rejected - margin)  [+ center_coef * (r_chosen + r_rejected)^2]
in nats; in bits it is what the model pays to encode which answer people picked: 1 bit per pair for a coin
flip (where a zero-initialised head starts), 0 for certainty. The margin (per pair, from the data) asks for
a gap of at least that much (Llama 2); the centring term pins the otherwise free offset of the rewards.
Chosen and rejected of a pair are scored in the same batch, as rows 0 and 1 of each (2, T) entry.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from llm_jax.config import RewardConfig
from llm_jax.data import preference
from llm_jax.losses import LN2, Objective

PAIR_AXES = ("batch", None, "length")  # (pairs, chosen|rejected, tokens)


def rewards(model, params, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(r_chosen, r_rejected), each (P,), from batch entries of shape (P, 2, T): both rows in one forward pass."""
    P, _, T = batch["inputs"].shape
    flat = [batch[k].reshape(2 * P, T) for k in ("inputs", "positions", "segment_ids")]
    r_PxC = model.apply({"params": params}, *flat).reshape(P, 2)
    return r_PxC[:, 0], r_PxC[:, 1]


def pair_sums(r_chosen_P, r_rejected_P, margin_P, valid_P, center_coef: float) -> dict:
    """Sums over the valid pairs; "loss" is the objective, "nats" its Bradley-Terry part alone."""
    diff_P = r_chosen_P - r_rejected_P
    nats_P = jax.nn.softplus(-(diff_P - margin_P))  # -log sigmoid(x) = softplus(-x), stable for any x
    center_P = (r_chosen_P + r_rejected_P) ** 2
    correct_P = jnp.where(diff_P > 0, 1.0, jnp.where(diff_P == 0, 0.5, 0.0))  # a tie is a coin flip
    v_P = valid_P.astype(jnp.float32)
    total = lambda x_P: jnp.sum(v_P * x_P)
    return {"loss": total(nats_P + center_coef * center_P), "nats": total(nats_P), "center": total(center_P),
            "pairs": jnp.sum(v_P), "correct": total(correct_P), "margin": total(diff_P),
            "chosen": total(r_chosen_P), "rejected": total(r_rejected_P),
            "squares": total(r_chosen_P ** 2 + r_rejected_P ** 2)}


def scalars(sums: dict, prefix: str) -> dict:
    """Per-pair means of the sums; reward_mean/std are over every answer scored (chosen and rejected)."""
    pairs = jnp.maximum(sums["pairs"], 1.0)
    mean = (sums["chosen"] + sums["rejected"]) / (2 * pairs)
    out = {"loss_bits_per_pair": sums["nats"] / pairs / LN2, "accuracy": sums["correct"] / pairs,
           "margin": sums["margin"] / pairs, "reward_chosen": sums["chosen"] / pairs,
           "reward_rejected": sums["rejected"] / pairs, "reward_mean": mean,
           "reward_std": jnp.sqrt(jnp.maximum(sums["squares"] / (2 * pairs) - mean ** 2, 0.0)),
           "centering": sums["center"] / pairs}
    return {f"{prefix}/{k}": v for k, v in out.items()}


def objective(cfg: RewardConfig) -> Objective:
    def sums(model, params, batch):
        r_chosen_P, r_rejected_P = rewards(model, params, batch)
        margin_P = batch["margin"] if cfg.use_margins else jnp.zeros_like(batch["margin"])
        return pair_sums(r_chosen_P, r_rejected_P, margin_P, batch["valid"], cfg.center_coef)

    # Every entry of data/preference.py's pair batches: the (pairs, 2, T) token rows, and per-pair scalars.
    axes = {k: PAIR_AXES if k in ("inputs", "positions", "segment_ids") else ("batch",) for k in preference.KEYS}
    return Objective(batch_axes=axes, sums=sums, loss="loss", count="pairs", scalars=scalars,
                     progress=("acc", "train/accuracy"))
