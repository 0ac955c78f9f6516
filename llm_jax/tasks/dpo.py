"""Direct preference optimisation (DPO, Rafailov et al. 2023) and IPO (Azar et al. 2023): a policy trained on
preference pairs against a frozen reference, with no reward model and no sampling.

For a pair, with log-probabilities summed over each answer's tokens (the prompt and padding excluded),
    h = (log π(chosen) - log ref(chosen)) - (log π(rejected) - log ref(rejected))
the losses are (dpo.loss)
    sigmoid  -(1 - ε) log σ(βh) - ε log σ(-βh)     (ε = dpo.label_smoothing: conservative DPO)
    ipo      (h - 1/(2β))²
β appears once, inside. β·(log π - log ref) is the answer's implicit reward; -log σ(βh) is what that implicit
reward model pays, in nats, to encode which answer people chose: `loss_bits_per_pair` reports it in bits,
exactly 1 while π = ref (step 0), whatever the training loss. The sequence-level sums follow the papers
(TRL's IPO averages over tokens instead).

The policy starts from checkpoint.init_from; the reference is that export's params, or dpo.reference's, loaded
once as the task's frozen params (train/step.py): read inside the step, with the same sharding as the policy,
never differentiated, updated or checkpointed. Chosen and rejected go through one forward pass of each model,
as rows 0 and 1 of each (2, T) entry (data/batches.PairTokenBatch, from data/chat/preference.py).
"""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from llm_jax.data.batches import PairTokenBatch, TokenBatch
from llm_jax.data.chat import preference
from llm_jax.errors import ConfigError
from llm_jax.model import flops
from llm_jax.tasks.base import Evaluation, Summary
from llm_jax.train import peft
from llm_jax.tasks.losses import LN2, next_token_nats_and_kl
from llm_jax.tasks.preference import PreferenceTask


def answer_nats(model, params, ref_params, batch: PairTokenBatch) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(-log π, -log ref, KL(π || ref)) at every position, each (P, 2, T): both answers of every pair in one
    forward pass of each model."""
    P, _, T = batch.inputs.shape
    flat = TokenBatch(*(x.reshape(2 * P, T) for x in batch[:len(TokenBatch._fields)]))
    return tuple(x.reshape(P, 2, T) for x in next_token_nats_and_kl(model, params, ref_params, flat))


def pair_sums(nats_Px2xT, ref_nats_Px2xT, kl_Px2xT, batch: PairTokenBatch, beta: float, loss: str,
              label_smoothing: float) -> dict:
    """Sums over the valid pairs: the objective ("loss"), the implicit reward model's log-loss ("nats"), and
    what the scalars report."""
    valid_P = batch.valid.astype(jnp.float32)
    weights_Px2xT = batch.weights.astype(jnp.float32) * valid_P[:, None, None]
    answer_sum = lambda x_Px2xT: jnp.sum(x_Px2xT * weights_Px2xT, axis=-1)  # (P, 2): over each answer's tokens
    logp_Px2, ref_logp_Px2 = -answer_sum(nats_Px2xT), -answer_sum(ref_nats_Px2xT)
    ratio_Px2 = logp_Px2 - ref_logp_Px2
    h_P = ratio_Px2[:, 0] - ratio_Px2[:, 1]
    preference_nats_P = jax.nn.softplus(-beta * h_P)  # -log σ(βh), stable for any h
    if loss == "sigmoid":
        loss_P = (1 - label_smoothing) * preference_nats_P + label_smoothing * jax.nn.softplus(beta * h_P)
    else:
        loss_P = (h_P - 1 / (2 * beta)) ** 2
    # While π = ref (step 0), h is 0 in a plain forward pass but float32 noise in the train step, whose
    # differentiated pass rounds differently: a preference is an h above that noise (1e-6 of the log-probs).
    noise_P = 1e-6 * jnp.sum(jnp.abs(logp_Px2) + jnp.abs(ref_logp_Px2), axis=-1)
    total = lambda x_P: jnp.sum(valid_P * x_P)
    tokens_Px2 = jnp.sum(weights_Px2xT, axis=-1)
    return {"loss": total(loss_P), "nats": total(preference_nats_P), "pairs": jnp.sum(valid_P),
            "correct": total((h_P > noise_P).astype(jnp.float32)), "margin": total(beta * h_P),
            "chosen": total(beta * ratio_Px2[:, 0]), "rejected": total(beta * ratio_Px2[:, 1]),
            "logp_chosen": jnp.sum(logp_Px2[:, 0]), "logp_rejected": jnp.sum(logp_Px2[:, 1]),
            "tokens_chosen": jnp.sum(tokens_Px2[:, 0]), "tokens_rejected": jnp.sum(tokens_Px2[:, 1]),
            "bytes_chosen": jnp.sum(answer_sum(batch.target_bytes.astype(jnp.float32))[:, 0]),
            "kl_chosen": jnp.sum(answer_sum(kl_Px2xT)[:, 0])}


def scalars(sums: dict, prefix: str) -> dict:
    """Per-pair means; log-probabilities and the KL per answer token in bits (log-probabilities negative)."""
    pairs_ = jnp.maximum(sums["pairs"], 1.0)
    chosen_tokens, rejected_tokens = jnp.maximum(sums["tokens_chosen"], 1.0), jnp.maximum(sums["tokens_rejected"], 1.0)
    out = {"loss": sums["loss"] / pairs_, "loss_bits_per_pair": sums["nats"] / pairs_ / LN2,
           "accuracy": sums["correct"] / pairs_, "margin": sums["margin"] / pairs_,
           "reward_chosen": sums["chosen"] / pairs_, "reward_rejected": sums["rejected"] / pairs_,
           "logp_chosen": sums["logp_chosen"] / chosen_tokens / LN2,
           "logp_rejected": sums["logp_rejected"] / rejected_tokens / LN2,
           "kl_to_reference": sums["kl_chosen"] / chosen_tokens / LN2,
           "chosen_bits_per_byte": -sums["logp_chosen"] / jnp.maximum(sums["bytes_chosen"], 1.0) / LN2}
    return {f"{prefix}/{k}": v for k, v in out.items()}


class DPO(PreferenceTask):
    name = "dpo"
    batch_type = PairTokenBatch
    summary_scalars = (("train/loss_bits_per_pair", "train bits/pair"), ("train/accuracy", "train accuracy"),
                       ("eval/accuracy", "eval accuracy"), ("eval/kl_to_reference", "eval KL bits/token"),
                       ("eval/chosen_bits_per_byte", "eval chosen bits/byte"),
                       ("eval/loss_bits_per_pair", "eval bits/pair"))
    prepared_type = preference.PreparedAnswerPairs

    def check(self) -> None:
        super().check()
        if not self.cfg.checkpoint.init_from:
            raise ConfigError("task=dpo trains a policy from an export: set checkpoint.init_from=EXPORT (an SFT, "
                              "pretrained or imported model; also the reference unless dpo.reference is set)")
        if self.cfg.model.dropout:  # one model computes both, so the reference's log-probabilities would be noisy too
            raise ConfigError(f"model.dropout={self.cfg.model.dropout}: task=dpo's reference would drop out as the "
                              "policy does; set model.dropout=0")

    def frozen_exports(self) -> dict[str, tuple[str, Path]]:
        if self.cfg.dpo.reference:
            return {"reference": ("dpo.reference", Path(self.cfg.dpo.reference).expanduser())}
        if peft.enabled(self.cfg):  # the reference is the frozen base, read without the adapters: no second copy
            return {}
        return {"reference": ("checkpoint.init_from", Path(self.cfg.checkpoint.init_from).expanduser())}

    def sums(self, model, params, batch: PairTokenBatch, frozen: dict) -> dict:
        d = self.cfg.dpo
        reference = frozen["reference"] if "reference" in frozen else frozen[peft.BASE]
        nats, ref_nats, kl = answer_nats(model, params, reference, batch)
        return pair_sums(nats, ref_nats, kl, batch, d.beta, d.loss, d.label_smoothing)

    def scalars(self, sums: dict, prefix: str) -> dict:
        return scalars(sums, prefix)

    @property
    def flops_per_token(self) -> float:
        # The policy's forward and backward pass and the reference's forward pass.
        return super().flops_per_token + flops.forward_flops_per_token(self.cfg.model, self.cfg.data.seq_len)

    def describe(self, data) -> str:
        return f"{super().describe(data)}, β={self.cfg.dpo.beta}, {self.cfg.dpo.loss} loss"

    def finish(self, data, evaluation: Evaluation) -> Summary:
        s = evaluation.scores
        return Summary({}, {}, f"\nheld-out pairs: {int(evaluation.sums['pairs']):,}, implicit-reward accuracy "
                               f"{s['eval/accuracy']:.1%}, {s['eval/loss_bits_per_pair']:.3f} bits/pair, margin "
                               f"{s['eval/margin']:+.3f}; chosen answers {s['eval/chosen_bits_per_byte']:.3f} "
                               f"bits/byte, KL to the reference {s['eval/kl_to_reference']:.4f} bits/token")
