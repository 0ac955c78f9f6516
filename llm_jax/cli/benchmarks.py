"""`llm-jax eval-tasks`: zero-, one- and few-shot benchmarks (evaluation/benchmarks.py) on any language model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_commands(sub) -> None:
    cmd = sub.add_parser("eval-tasks", help="in-context benchmarks (BLiMP, SLING, TruthfulQA MC2, GSM8K, CMMLU, "
                         "PIQA) at given shot counts: accuracy, its standard error, items, chance")
    cmd.add_argument("--checkpoint", help="a run directory (its latest checkpoint) or an `llm-jax export` directory "
                     "of a language model (needed unless --tasks list)")
    cmd.add_argument("--step", type=int, help="checkpoint step of a run directory (default: the latest)")
    cmd.add_argument("--tasks", required=True, metavar="NAMES",
                     help="comma-separated benchmark names (the shared eval_* folders without eval_); list: print them")
    cmd.add_argument("--shots", default="0", metavar="K[,K...]", help="exemplars before each question (default 0)")
    cmd.add_argument("--limit", type=int, default=0, metavar="N", help="score the first N items of each (0: all)")
    cmd.add_argument("--seed", type=int, default=1234, help="which exemplars are drawn (the same for every model)")
    cmd.add_argument("--context", type=int, help="tokens per prompt (default: the checkpoint's data.seq_len)")
    cmd.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass")
    cmd.add_argument("--max-gen-tokens", type=int, default=256, help="generation benchmarks: the answer's budget")
    cmd.add_argument("--data-dir", help="where the eval_* folders are (default: $LLM_JAX_DATA, else ../shared/data)")
    cmd.add_argument("--json", metavar="OUT", help='also write {task: {"<k>shot": {"acc", "stderr", "n", "chance", '
                     '...}}} here')
    cmd.add_argument("--write-prompts", metavar="DIR", help="write the exact prompts and choices scored, one JSONL "
                     "file per benchmark and shot count")
    cmd.set_defaults(fn=_eval_tasks)


def _eval_tasks(args: argparse.Namespace) -> int:
    from llm_jax.atomic import write_atomic
    from llm_jax.config import Config, data_dir
    from llm_jax.errors import ConfigError
    from llm_jax.evaluation import benchmarks, suite
    if args.tasks == "list":
        print(suite.describe())
        return 0
    if not args.checkpoint:
        raise ConfigError("--checkpoint: give the model to evaluate (a run directory or an export)")
    names = tuple(n.strip() for n in args.tasks.split(",") if n.strip())
    unknown = [n for n in names if n not in benchmarks.TASKS]
    if unknown or not names:
        raise ConfigError(f"--tasks: {', '.join(unknown) or 'none given'} unknown (known: "
                          f"{', '.join(benchmarks.TASKS)})")
    try:
        shots = tuple(sorted({int(k) for k in args.shots.split(",")}))
    except ValueError:
        raise ConfigError(f"--shots={args.shots!r}: give counts like 0,1,5") from None
    if min(shots) < 0 or args.limit < 0 or args.batch_size < 1:
        raise ConfigError(f"--shots={args.shots}, --limit={args.limit}, --batch-size={args.batch_size}: counts >= 0, "
                          "batch size >= 1")
    from llm_jax.inference.runner import ModelRunner, default_context
    cfg, runner, tokenizer = ModelRunner.load(Path(args.checkpoint), args.step)
    root = Path(args.data_dir) if args.data_dir else data_dir(Config())
    results = suite.run(runner, tokenizer, names, shots, root, context=args.context or default_context(cfg),
                        limit=args.limit, seed=args.seed, batch_size=args.batch_size,
                        max_gen_tokens=args.max_gen_tokens,
                        prompts_dir=Path(args.write_prompts) if args.write_prompts else None)
    print(suite.format_table(results))
    if args.json:
        write_atomic(Path(args.json), json.dumps(results, indent=2) + "\n")
    return 0
