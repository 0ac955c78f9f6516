"""Autoregressive generation with a KV cache: prefill the prompts, then one token per jitted step.

Prompts of different lengths are left-padded (segment 0, which the cache mask ignores), so every row
writes its next token at the same cache index. The host loop fetches each step's tokens, which lets
callers stream them and stops once every row has produced a stop token or the budget is spent.
Sampling: temperature 0 is greedy; otherwise logits are divided by the temperature, then restricted to
the top-k and to the smallest set whose probability reaches top-p (nucleus), then sampled. check_sampling
validates the settings before anything is loaded, under the names the caller's users know them by.
A Generator made with trace=K also returns, from the same jitted steps, what the model believed at each step
(StepTrace: the chosen token's log-probability and the K most probable tokens), for `llm-jax sample --trace`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.data.batches import positions_from_segments
from llm_jax.errors import ConfigError
from llm_jax.inference.runner import ModelRunner


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: no top-k restriction
    top_p: float = 1.0  # 1: no nucleus restriction


def flag_name(field: str) -> str:
    """The `llm-jax sample/chat` flag of a generation setting: top_p -> --top-p."""
    return "--" + field.replace("_", "-")


def check_sampling(sampling: Sampling, max_tokens: int, *, model: ModelConfig | None = None,
                   prompt: str | None = None, name: Callable[[str], str] = flag_name) -> None:
    """A one-line ConfigError for the first setting out of range, named `name(field)` for field in temperature,
    top_k, top_p, max_tokens, prompt (the CLI's flags by default; a config section passes its own, e.g.
    `lambda f: f"ppo.{f}"`, or a dict's `__getitem__`). The bounds that depend on the model (its vocabulary,
    its learned position table) are checked when `model` is given; the prompt when it is given."""
    def bad(field: str, value, allowed: str) -> ConfigError:
        return ConfigError(f"{name(field)}={value}: must be {allowed}")

    t, k, p = sampling.temperature, sampling.top_k, sampling.top_p
    if not (math.isfinite(t) and t >= 0):
        raise bad("temperature", t, "a finite number >= 0 (0: greedy)")
    if not 0 < p <= 1:
        raise bad("top_p", p, "in (0, 1] (1: off)")
    if k < 0 or (model is not None and k > model.vocab_size):
        raise bad("top_k", k, ">= 0 (0: off)" if model is None else
                  f"in [0, {model.vocab_size}], the vocabulary size (0: off)")
    # RoPE decodes past max_seq_len; only a learned position table bounds the context.
    context = model.max_seq_len if model is not None and model.position == "learned" else None
    if max_tokens < 1 or (context is not None and max_tokens > context):
        raise bad("max_tokens", max_tokens, ">= 1" if context is None else
                  f"in [1, {context}], the model's max_seq_len")
    if prompt is not None and not prompt:
        raise bad("prompt", "''", "non-empty text")


def filter_logits(logits_BxV: jax.Array, top_k, top_p) -> jax.Array:
    """-inf outside the top-k tokens and outside the nucleus of probability top_p (taken after the top-k cut).
    top_k and top_p are numbers, or arrays [B] of one setting per row (the server's rows each have their own)."""
    static = isinstance(top_k, int) and isinstance(top_p, float)
    if static and top_p >= 1.0:  # no nucleus: nothing to sort
        if top_k:
            kth_B = jax.lax.top_k(logits_BxV, top_k)[0][:, -1]
            logits_BxV = jnp.where(logits_BxV < kth_B[:, None], -jnp.inf, logits_BxV)
        return logits_BxV
    V = logits_BxV.shape[-1]
    k_Bx1 = jnp.broadcast_to(jnp.asarray(top_k), logits_BxV.shape[:1])[:, None]
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    sorted_BxV = jnp.where((jnp.arange(V)[None] < k_Bx1) | (k_Bx1 == 0), sorted_BxV, -jnp.inf)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    # A token stays if the mass of the tokens ranked above it is still below top_p (the first always stays); a row
    # with top_p 1 keeps every token whatever float32's cumulative sum rounds to.
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    p_Bx1 = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), logits_BxV.shape[:1])[:, None]
    kept_BxV = jnp.where(((before_BxV < p_Bx1) | (p_Bx1 >= 1)) & (sorted_BxV > -jnp.inf), sorted_BxV, jnp.inf)
    threshold_B = jnp.min(kept_BxV, axis=-1)
    return jnp.where(logits_BxV < threshold_B[:, None], -jnp.inf, logits_BxV)


def sample_token(logits_BxV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    if sampling.temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = filter_logits(logits_BxV / sampling.temperature, sampling.top_k, float(sampling.top_p))
    return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def sample_rows(logits_BxV: jax.Array, keys_B: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array,
                top_p_B: jax.Array) -> jax.Array:
    """sample_token with one key and one set of settings per row (temperature 0: that row is greedy). A row's
    token depends on its own logits, key and settings only, whatever the other rows hold. The filters' sort and
    the draw run only when some row asks for them (lax.cond): a batch of greedy rows pays for an argmax."""
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def draw(logits_BxV):
        scaled_BxV = logits_BxV / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
        filtered_BxV = jax.lax.cond(jnp.any((temperature_B > 0) & ((top_k_B > 0) | (top_p_B < 1))),
                                    lambda x: filter_logits(x, top_k_B, top_p_B), lambda x: x, scaled_BxV)
        drawn_B = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys_B, filtered_BxV)
        return jnp.where(temperature_B > 0, drawn_B.astype(jnp.int32), greedy_B)
    return jax.lax.cond(jnp.any(temperature_B > 0), draw, lambda _: greedy_B, logits_BxV)


class StepTrace(NamedTuple):
    """One step's next-token distribution per row: log-softmax of the raw logits (temperature 1, before top-k
    and top-p), i.e. what the model believes, whatever the sampling settings then draw from it."""
    logprob_B: jax.Array  # of the chosen token
    top_ids_BxK: jax.Array  # the K most probable tokens, most probable first
    top_logprobs_BxK: jax.Array


def step_trace(logits_BxV: jax.Array, token_B: jax.Array, k: int) -> StepTrace:
    # On device: K values per row cross to the host, not the vocabulary's logits.
    logprobs_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    top_logprobs_BxK, top_ids_BxK = jax.lax.top_k(logprobs_BxV, k)
    chosen_B = jnp.take_along_axis(logprobs_BxV, token_B[:, None], axis=-1)[:, 0]
    return StepTrace(chosen_B, top_ids_BxK.astype(jnp.int32), top_logprobs_BxK)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, width: int = 0):
    """tokens, positions and segment ids (B, P) of left-padded prompts, and each prompt's length; P is the
    longest prompt's length, or `width` if that is more."""
    lengths = np.array([len(p) for p in prompts], int)
    if not len(lengths):
        raise ConfigError("no prompts: generation needs at least one")
    if lengths.min() == 0:
        raise ConfigError(f"prompt {int(lengths.argmin())} is empty: every prompt needs at least 1 token")
    width = max(int(lengths.max()), width)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    segments = np.zeros((len(prompts), width), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, width - len(prompt):] = prompt
        segments[row, width - len(prompt):] = 1
    return tokens, positions_from_segments(segments), segments, lengths


class Generator:
    """Jitted prefill and decode steps for one model; reuse it across calls to keep the compilations.

    Runs through the given ModelRunner (runner.py): on the mesh its params are laid out on, with the model's
    logical sharding rules in force (batch over data and fsdp, heads over tensor, the KV cache sharded like
    the keys). The params are an argument of the jitted steps, so `generate(..., params=...)` decodes with
    other values of the same shapes as the runner's (a policy being trained) without compiling again.

    trace=K > 0: each step also computes a StepTrace with the K most probable tokens (all of them if the
    vocabulary is smaller), passed to generate's `on_trace`; trace=0 (the default) compiles the steps without it.
    """

    def __init__(self, runner: ModelRunner, sampling: Sampling = Sampling(), trace: int = 0):
        self.runner, self.sampling = runner, sampling
        self.trace = min(trace, runner.cfg.vocab_size)
        self.model = runner.model(decode=True)
        self._prefill = self.runner.jit(self._prefill_fn)
        self._step = self.runner.jit(self._step_fn, donate_argnums=(1,))

    def _choose(self, logits_BxV, rng):
        """The next token of each row and, with trace, the step's StepTrace (else None)."""
        token_B = sample_token(logits_BxV, rng, self.sampling)
        return token_B, step_trace(logits_BxV, token_B, self.trace) if self.trace else None

    def _prefill_fn(self, params, cache, tokens, positions, segments, rng):
        logits, updated = self.model.apply({"params": params, "cache": cache}, tokens, positions, segments,
                                           mutable=["cache"])
        return self._choose(logits[:, -1], rng), updated["cache"]

    def _step_fn(self, params, cache, token_B, position_B, rng):
        logits, updated = self.model.apply({"params": params, "cache": cache}, token_B[:, None],
                                           position_B[:, None], jnp.ones_like(token_B)[:, None], mutable=["cache"])
        return self._choose(logits[:, -1], rng), updated["cache"]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, seed: int = 0,
                 stop_ids: Sequence[int] = (), pad_id: int = 0,
                 on_tokens: Callable[[list[int | None]], None] | None = None, params=None,
                 prompt_width: int = 0,
                 on_trace: Callable[[list[int | None], StepTrace], None] | None = None) -> list[list[int]]:
        """New tokens for each prompt (a stop token included, nothing after it). `on_tokens` receives each
        step's token per row (None for rows already stopped), for streaming; `on_trace` (a Generator with
        trace > 0) the same and the step's StepTrace, as numpy arrays. prompt_width: pad the prompts to at
        least this many tokens, so that calls with prompts of other lengths reuse one compilation (RL rollouts)."""
        params = self.runner.params if params is None else params
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens}: must be >= 1")
        if on_trace is not None and not self.trace:
            raise ConfigError("on_trace needs a Generator made with trace > 0")
        tokens, positions, segments, lengths = left_pad(prompts, pad_id, prompt_width)
        total = tokens.shape[1] + max_new_tokens
        self.runner.check_length(int(lengths.max()) + max_new_tokens, "prompt + max tokens")
        rngs = jax.random.split(jax.random.key(seed), max_new_tokens)
        (token, trace), cache = self._prefill(params, self.runner.empty_cache(len(prompts), total), tokens,
                                              positions, segments, rngs[0])
        outputs: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(len(prompts), bool)
        stop = set(stop_ids)
        for t in range(max_new_tokens):
            host, host_trace = jax.device_get((token, trace))  # fetched together; None without trace
            step_tokens: list[int | None] = []
            for row, tok in enumerate(np.asarray(host).tolist()):
                step_tokens.append(None if done[row] else tok)
                if not done[row]:
                    outputs[row].append(tok)
                    done[row] = tok in stop
            if on_tokens is not None:
                on_tokens(step_tokens)
            if on_trace is not None:
                on_trace(step_tokens, host_trace)
            if done.all() or t == max_new_tokens - 1:
                break
            (token, trace), cache = self._step(params, cache, token, jnp.asarray(lengths + t, jnp.int32), rngs[t + 1])
        return outputs
