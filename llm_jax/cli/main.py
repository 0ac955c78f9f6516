"""`llm-jax <command>`: the command line, one module per group of commands.

  train.py     train, prepare, export, show-masks
  generate.py  sample, chat
  evaluate.py  eval, score, compare, compress, decompress
  benchmarks.py  eval-tasks
  interop.py   import-hf, export-hf
  tools.py     bench, sweep, report
  serve.py     serve

Errors a user can fix (config, mesh, data, run directory, checkpoint, launcher, Hugging Face directory) are
printed as one line and exit with 2; a preempted run (SIGTERM/SIGINT, checkpoint saved) exits with 75, a
non-finite loss under train.nonfinite=stop with 3 (llm_jax/errors.py).
"""
from __future__ import annotations

import argparse
import sys

from llm_jax.cli import benchmarks, evaluate, generate, interop, serve, tools, train
from llm_jax.errors import NONFINITE_EXIT, PREEMPTED_EXIT, USAGE_EXIT, NonFiniteError, Preempted, UserError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-jax", description="Decoder-only language models in JAX, reported as "
                                "compression.")
    sub = p.add_subparsers(dest="command", required=True)
    for group in (train, generate, evaluate, benchmarks, interop, tools, serve):
        group.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Orbax reports every save and restore through absl at INFO/WARNING; the CLI prints what matters.
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        return args.fn(args)
    except UserError as e:
        print(f"llm-jax: error: {e}", file=sys.stderr)
        return USAGE_EXIT
    except Preempted as e:
        print(f"llm-jax: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    except NonFiniteError as e:
        print(f"llm-jax: error: {e}", file=sys.stderr)
        return NONFINITE_EXIT
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        print("llm-jax: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
