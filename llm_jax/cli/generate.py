"""`llm-jax sample | chat`: text from a language model, streamed as it is generated; `sample --trace` shows each
token with the model's probability of it and its most probable alternatives (inference/trace.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from llm_jax.cli.args import checkpoint_args, sampling_args, sampling_of
from llm_jax.errors import ConfigError


def add_commands(sub) -> None:
    sample = sub.add_parser("sample", help="continue a prompt, streaming the tokens")
    _generation_args(sample, max_tokens=200)
    sample.add_argument("--prompt", required=True)
    sample.add_argument("--trace", action="store_true",
                        help="print each generated token with its probability and the --top most probable tokens: "
                        "the model's distribution at that step, softmax of the raw logits (temperature 1, before "
                        "--top-k/--top-p), whatever token sampling then draws (temperature 0: the most probable)")
    sample.add_argument("--top", type=int, metavar="N", help="with --trace: how many alternatives (default 5)")
    sample.add_argument("--json", action="store_true", help="with --trace: the trace as one JSON document")
    sample.add_argument("--ignore-eos", action="store_true",
                        help="generate all --max-tokens tokens, past EOS and end-of-turn tokens (the classic demos' "
                        "loop, e.g. a Chinese GPT-2 going on after [SEP])")
    sample.set_defaults(fn=_sample)
    chat = sub.add_parser("chat", help="talk with a model in the terminal through the chat template")
    _generation_args(chat, max_tokens=256)
    chat.add_argument("--system", default="", help="an optional system message")
    chat.set_defaults(fn=_chat)


def _generation_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    checkpoint_args(parser)
    sampling_args(parser, max_tokens, temperature=0.8)


def _generator(args: argparse.Namespace, prompt: str | None = None, trace: int = 0):
    from llm_jax.inference.generate import Generator, check_sampling
    from llm_jax.inference.runner import ModelRunner
    sampling = sampling_of(args)
    check_sampling(sampling, args.max_tokens, prompt=prompt)  # before loading: a bad flag costs nothing
    cfg, runner, tokenizer = ModelRunner.load(Path(args.checkpoint), args.step)
    check_sampling(sampling, args.max_tokens, model=runner.cfg)  # the bounds only the model knows
    return Generator(runner, sampling, trace=trace), tokenizer, cfg


def _sample(args: argparse.Namespace) -> int:
    top = _trace_top(args)
    from llm_jax.data.chat.template import stop_ids
    generator, tokenizer, cfg = _generator(args, prompt=args.prompt, trace=top)
    stops = set() if args.ignore_eos else stop_ids(tokenizer, cfg.data.chat_template)
    if top:
        from llm_jax.inference.trace import trace_sample
        trace_sample(generator, tokenizer, args.prompt, args.max_tokens, args.seed, as_json=args.json, stops=stops)
    else:
        from llm_jax.inference.stream import sample
        sample(generator, tokenizer, args.prompt, args.max_tokens, args.seed, stops=stops)
    return 0


def _trace_top(args: argparse.Namespace) -> int:
    """How many alternatives --trace shows, 0 without --trace; its options without it are an error (not ignored)."""
    if not args.trace:
        for flag, given in (("--json", args.json), ("--top", args.top is not None)):
            if given:
                raise ConfigError(f"{flag}: only with --trace")
        return 0
    top = 5 if args.top is None else args.top
    if top < 1:
        raise ConfigError(f"--top={top}: must be >= 1")
    return top


def _chat(args: argparse.Namespace) -> int:
    from llm_jax.inference.stream import chat
    generator, tokenizer, cfg = _generator(args)
    chat(generator, tokenizer, args.max_tokens, args.seed, system=args.system, template=cfg.data.chat_template)
    return 0
