"""Arguments several commands share, and the config they resolve to."""
from __future__ import annotations

import argparse


def experiment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="experiment file (experiments/pretrain_tiny.py) or its name (pretrain_tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set model.n_layers=4 (repeatable)")
    parser.add_argument("--data-dir", help="where the shared data sets live (sets data.data_dir)")


def resolve(args):
    """The config of --config with its --set overrides (and --data-dir), init_from applied, validated."""
    from llm_jax.experiment import from_command_line
    return from_command_line(args.config, [*args.overrides, *([f"data.data_dir={args.data_dir}"]
                                                               if args.data_dir else [])])


def checkpoint_args(parser: argparse.ArgumentParser, what: str = "a run directory (its latest checkpoint) or an "
                    "`llm-jax export` directory") -> None:
    parser.add_argument("--checkpoint", required=True, help=what)
    parser.add_argument("--step", type=int, help="checkpoint step of a run directory (default: the latest)")


def sampling_args(parser: argparse.ArgumentParser, max_tokens: int, temperature: float) -> None:
    """The sampling flags of the commands that generate (see inference/generate.py)."""
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: off")
    parser.add_argument("--seed", type=int, default=0)


def sampling_of(args: argparse.Namespace):
    """The generate.Sampling of sampling_args' flags."""
    from llm_jax.inference.generate import Sampling
    return Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
