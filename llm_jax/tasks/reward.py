"""The pairwise reward model: Bradley-Terry on chosen vs rejected answers to the same prompt.

P(chosen preferred) = sigmoid(r_chosen - r_rejected), so the loss of a pair is
    -log sigmoid(r_chosen - r_rejected - margin)  [+ reward.center_coef * (r_chosen + r_rejected)^2]
in nats; in bits it is what the model pays to encode which answer people picked: 1 bit per pair for a coin
flip (where a zero-initialised head starts), 0 for certainty. The margin (per pair, from the data) asks for
a gap of at least that much (Llama 2); the centring term pins the otherwise free offset of the rewards.
Chosen and rejected of a pair are scored in one forward pass, as rows 0 and 1 of each (2, T) entry
(data/batches.PairBatch, prepared by data/chat/preference.py).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from llm_jax.data.batches import PairBatch
from llm_jax.data.chat import preference
from llm_jax.tasks.base import Evaluation, Summary
from llm_jax.tasks.losses import LN2
from llm_jax.tasks.preference import PreferenceTask


def rewards(model, params, batch: PairBatch) -> tuple[jax.Array, jax.Array]:
    """(r_chosen, r_rejected), each (P,), from entries of shape (P, 2, T): both rows in one forward pass."""
    P, _, T = batch.inputs.shape
    flat = [x.reshape(2 * P, T) for x in (batch.inputs, batch.positions, batch.segment_ids)]
    r_Px2 = model.apply({"params": params}, *flat).reshape(P, 2)
    return r_Px2[:, 0], r_Px2[:, 1]


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
    pairs_ = jnp.maximum(sums["pairs"], 1.0)
    mean = (sums["chosen"] + sums["rejected"]) / (2 * pairs_)
    out = {"loss_bits_per_pair": sums["nats"] / pairs_ / LN2, "accuracy": sums["correct"] / pairs_,
           "margin": sums["margin"] / pairs_, "reward_chosen": sums["chosen"] / pairs_,
           "reward_rejected": sums["rejected"] / pairs_, "reward_mean": mean,
           "reward_std": jnp.sqrt(jnp.maximum(sums["squares"] / (2 * pairs_) - mean ** 2, 0.0)),
           "centering": sums["center"] / pairs_}
    return {f"{prefix}/{k}": v for k, v in out.items()}


class RewardModel(PreferenceTask):
    name = "reward"
    head = "reward"
    batch_type = PairBatch
    summary_scalars = (("train/loss_bits_per_pair", "train bits/pair"), ("train/accuracy", "train accuracy"),
                       ("eval/accuracy", "eval accuracy"), ("eval/loss_bits_per_pair", "eval bits/pair"))
    prepared_type = preference.PreparedPreference

    def sums(self, model, params, batch: PairBatch, frozen: dict) -> dict:
        r_chosen_P, r_rejected_P = rewards(model, params, batch)
        margin_P = batch.margin if self.cfg.reward.use_margins else jnp.zeros_like(batch.margin)
        return pair_sums(r_chosen_P, r_rejected_P, margin_P, batch.valid, self.cfg.reward.center_coef)

    def scalars(self, sums: dict, prefix: str) -> dict:
        return scalars(sums, prefix)

    def finish(self, data, evaluation: Evaluation) -> Summary:
        sums, s = evaluation.sums, evaluation.scores
        return Summary({}, {}, f"\nheld-out pairs: {int(sums['pairs']):,}, accuracy {s['eval/accuracy']:.1%}, "
                               f"{s['eval/loss_bits_per_pair']:.3f} bits/pair, rewards {s['eval/reward_mean']:+.3f} "
                               f"± {s['eval/reward_std']:.3f} (stored with the checkpoint for `llm-jax score`)")
