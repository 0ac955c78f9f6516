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
