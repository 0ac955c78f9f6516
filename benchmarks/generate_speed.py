"""Decode speed with and without the KV cache, at batch 1 and 16 (greedy, one jitted step per token).

    python benchmarks/generate_speed.py [--checkpoint RUN_OR_EXPORT] [--prompt-len 32] [--new-tokens 128]

Without a checkpoint, pretrain_tiny's model with random weights is used (speed does not depend on them).
"Without cache" recomputes the forward pass over the whole fixed-length sequence for every new token,
which is what decoding costs when nothing is cached.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from llm_jax.experiment import load_experiment
from llm_jax.inference.generate import Generator, Sampling
from llm_jax.inference.runner import ModelRunner
from llm_jax.model import Transformer


def without_cache(cfg, params, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    batch, prompt_len = prompts.shape
    total = prompt_len + new_tokens
    forward = jax.jit(Transformer(cfg).apply)
    tokens = np.zeros((batch, total), np.int32)
    tokens[:, :prompt_len] = prompts
    positions = np.broadcast_to(np.arange(total, dtype=np.int32), (batch, total))
    segments = np.ones((batch, total), np.int32)
    for t in range(prompt_len, total):
        logits = forward({"params": params}, tokens, positions, segments)
        tokens[:, t] = np.asarray(jnp.argmax(logits[:, t - 1], axis=-1))
    return tokens[:, prompt_len:]


def timed(fn, repeats: int = 2) -> float:
    fn()  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    if args.checkpoint:
        from llm_jax.train.export import load_for_inference
        cfg, params, _ = load_for_inference(args.checkpoint)
        model_cfg = cfg.model
    else:
        model_cfg = load_experiment("pretrain_tiny").model
        dummy = jnp.zeros((1, 8), jnp.int32)
        params = nn.unbox(Transformer(model_cfg).init(jax.random.key(0), dummy, dummy, dummy + 1))["params"]
    gen = Generator(ModelRunner(model_cfg, params), Sampling(temperature=0))
    print(f"{jax.devices()[0].device_kind}, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy")
    print(f"{'batch':>5}  {'KV cache tok/s':>15}  {'no cache tok/s':>15}  speed-up")
    for batch in (1, 16):
        prompts = np.random.default_rng(0).integers(1, model_cfg.vocab_size, (batch, args.prompt_len))
        cached = timed(lambda: gen.generate(prompts.tolist(), args.new_tokens))
        plain = timed(lambda: without_cache(model_cfg, params, prompts, args.new_tokens), repeats=1)
        rate = lambda s: batch * args.new_tokens / s
        print(f"{batch:>5}  {rate(cached):>15,.0f}  {rate(plain):>15,.0f}  {plain / cached:7.1f}x")


if __name__ == "__main__":
    main()
