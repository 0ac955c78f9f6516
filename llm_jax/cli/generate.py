"""`llm-jax sample | chat`: text from a language model, streamed as it is generated."""
from __future__ import annotations

import argparse
from pathlib import Path

from llm_jax.cli.args import checkpoint_args, sampling_args, sampling_of


def add_commands(sub) -> None:
    sample = sub.add_parser("sample", help="continue a prompt, streaming the tokens")
    _generation_args(sample, max_tokens=200)
    sample.add_argument("--prompt", required=True)
    sample.set_defaults(fn=_sample)
    chat = sub.add_parser("chat", help="talk with a model in the terminal through the chat template")
    _generation_args(chat, max_tokens=256)
    chat.add_argument("--system", default="", help="an optional system message")
    chat.set_defaults(fn=_chat)


def _generation_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    checkpoint_args(parser)
    sampling_args(parser, max_tokens, temperature=0.8)


def _generator(args: argparse.Namespace, prompt: str | None = None):
    from llm_jax.inference.generate import Generator, check_sampling
    from llm_jax.inference.runner import ModelRunner
    sampling = sampling_of(args)
    check_sampling(sampling, args.max_tokens, prompt=prompt)  # before loading: a bad flag costs nothing
    _, runner, tokenizer = ModelRunner.load(Path(args.checkpoint), args.step)
    check_sampling(sampling, args.max_tokens, model=runner.cfg)  # the bounds only the model knows
    return Generator(runner, sampling), tokenizer


def _sample(args: argparse.Namespace) -> int:
    from llm_jax.inference.stream import sample
    generator, tokenizer = _generator(args, prompt=args.prompt)
    sample(generator, tokenizer, args.prompt, args.max_tokens, args.seed)
    return 0


def _chat(args: argparse.Namespace) -> int:
    from llm_jax.inference.stream import chat
    generator, tokenizer = _generator(args)
    chat(generator, tokenizer, args.max_tokens, args.seed, system=args.system)
    return 0
