"""The arithmetic of reinforcement learning from rewards (tasks/rl.py), as pure functions on (N, T) arrays of
N answers, aligned on next-token targets: `mask` is 1 on the targets that are answer tokens.

KL estimators (Schulman, "Approximating KL divergence", 2020), per sampled token with r = log ref - log π:
k1 = -r (unbiased, can be negative), k2 = r²/2 (biased, low variance), k3 = e^r - 1 - r (unbiased, >= 0).
GAE (Schulman et al. 2016) runs over each answer's tokens only: the state after the answer's last token is
terminal (value 0), and neither the prompt nor the padding enters it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def kl_estimate(logp, ref_logp, estimator: str):
    """The per-token KL estimate of `estimator` (k1 | k2 | k3); numpy or jax arrays."""
    xp = jnp if isinstance(logp, jax.Array) else np
    r = ref_logp - logp
    if estimator == "k1":
        return -r
    if estimator == "k2":
        return 0.5 * r * r
    return xp.exp(r) - 1.0 - r


def token_rewards(scores_N: np.ndarray, kl_NxT: np.ndarray, mask_NxT: np.ndarray, kl_coef: float) -> np.ndarray:
    """InstructGPT's per-token reward: -β·KL on every answer token, and the score added on the answer's last
    token (the reward model judged the whole answer there). kl_NxT is 0 when the KL is a loss term instead."""
    rewards_NxT = -kl_coef * kl_NxT * mask_NxT
    last_N = mask_NxT.shape[1] - 1 - np.argmax(mask_NxT[:, ::-1] > 0, axis=1)
    rewards_NxT[np.arange(len(scores_N)), last_N] += scores_N
    return rewards_NxT


def gae(rewards_NxT: np.ndarray, values_NxT: np.ndarray, mask_NxT: np.ndarray, gamma: float,
        lam: float) -> tuple[np.ndarray, np.ndarray]:
    """(advantages, returns), 0 outside the mask: A_t = δ_t + γλ A_{t+1}, δ_t = r_t + γ V_{t+1} - V_t, with
    V and A after the last answer token 0; returns = A + V, the value model's targets."""
    N, T = rewards_NxT.shape
    advantages_NxT = np.zeros((N, T), np.float32)
    next_value_N, next_adv_N = np.zeros(N, np.float32), np.zeros(N, np.float32)
    for t in reversed(range(T)):
        on_N = mask_NxT[:, t] > 0
        delta_N = rewards_NxT[:, t] + gamma * next_value_N - values_NxT[:, t]
        adv_N = delta_N + gamma * lam * next_adv_N
        advantages_NxT[:, t] = np.where(on_N, adv_N, 0.0)
        next_value_N = np.where(on_N, values_NxT[:, t], next_value_N)
        next_adv_N = np.where(on_N, adv_N, next_adv_N)
    return advantages_NxT, (advantages_NxT + values_NxT) * mask_NxT


def whiten(x_NxT: np.ndarray, mask_NxT: np.ndarray) -> np.ndarray:
    """x to mean 0 and standard deviation 1 over the masked entries (0 elsewhere)."""
    on = mask_NxT > 0
    mean, std = x_NxT[on].mean(), x_NxT[on].std()
    return np.where(on, (x_NxT - mean) / (std + 1e-8), 0.0).astype(np.float32)


def group_advantages(rewards_N: np.ndarray, k: int, algorithm: str) -> tuple[np.ndarray, np.ndarray]:
    """(advantage per answer, whether its group's rewards have no spread) for N = G·k answers, k per prompt in
    consecutive rows. grpo: (R - group mean) / (group std + 1e-4) (population std); rloo: R minus the mean of
    the other k-1 answers' rewards. A group with equal rewards gives every answer advantage 0: no signal."""
    groups_Gxk = rewards_N.reshape(-1, k).astype(np.float64)
    mean_G1 = groups_Gxk.mean(axis=1, keepdims=True)
    std_G1 = groups_Gxk.std(axis=1, keepdims=True)
    if algorithm == "grpo":
        adv_Gxk = (groups_Gxk - mean_G1) / (std_G1 + 1e-4)
    else:
        adv_Gxk = (groups_Gxk - mean_G1) * k / (k - 1)  # R - (sum - R)/(k-1)
    zero_spread_Gxk = np.broadcast_to(std_G1 <= 1e-6 * (1.0 + np.abs(mean_G1)), groups_Gxk.shape)
    return adv_Gxk.reshape(-1).astype(np.float32), zero_spread_Gxk.reshape(-1)


def adapt_kl_coef(kl_coef: float, kl: float, target: float, n_answers: int, horizon: int) -> float:
    """Ziegler et al. (2019)'s proportional controller: β·(1 + clip(KL/target - 1, ±0.2)·n/horizon), after a
    rollout of n answers whose mean KL (nats per answer) was `kl`."""
    error = float(np.clip(kl / target - 1.0, -0.2, 0.2))
    return kl_coef * (1.0 + error * n_answers / horizon)
