"""`llm-jax train | prepare | export | show-masks`: training runs and what they start from."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from llm_jax.cli.args import experiment_args, resolve


def add_commands(sub) -> None:
    train = sub.add_parser("train", help="train a model from an experiment config (any task)")
    experiment_args(train)
    train.add_argument("--run-dir", help="where TensorBoard logs, checkpoints, config and results go "
                                         "(default: runs/<name>-<time>); an existing run there is resumed")
    train.add_argument("--fresh", action="store_true", help="delete the run in --run-dir and start over")
    group = train.add_argument_group("multi-process", "one job over several processes (launch/local-multiprocess "
                                     "passes these; SLURM and TPU pods are detected: llm_jax/parallel/distributed.py)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordination service")
    group.add_argument("--num-processes", type=int, help="processes in the job")
    group.add_argument("--process-id", type=int, help="this process's index, 0 .. num-processes - 1")
    train.set_defaults(fn=_train)
    prep = sub.add_parser("prepare", help="tokenize an experiment's data once (then --set data.prepared=DIR)")
    experiment_args(prep)
    prep.add_argument("--out", required=True, help="output directory")
    prep.set_defaults(fn=_prepare)
    export = sub.add_parser("export", help="write the params of a checkpoint for init_from / inference")
    export.add_argument("--run-dir", required=True, help="a training run directory")
    export.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    export.add_argument("--out", required=True, help="output directory (must not exist)")
    export.add_argument("--merge", action="store_true",
                        help="a peft run: the whole model (its base with the adapters; LoRA folded into the kernels)")
    export.set_defaults(fn=_export)
    masks = sub.add_parser("show-masks", help="print SFT examples with the tokens trained on marked")
    experiment_args(masks)
    masks.add_argument("--n", type=int, default=3, help="how many dialogues")
    masks.set_defaults(fn=_show_masks)


def _train(args: argparse.Namespace) -> int:
    from llm_jax.parallel.distributed import initialize, is_main
    from llm_jax.train.loop import train
    cfg = resolve(args)
    initialize(args.coordinator, args.num_processes, args.process_id)
    run_dir = Path(args.run_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    train(cfg, run_dir, fresh=args.fresh)
    if is_main():
        print(f"run directory: {run_dir}   (tensorboard --logdir {run_dir})")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from llm_jax import tasks
    task = tasks.make(resolve(args))
    task.prepare(Path(args.out))
    data = task.load(Path(args.out))  # what training will read: damaged or reused data fails here, not there
    print(f"prepared data in {args.out} ({task.describe(data)}); train on it with --set data.prepared={args.out}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from llm_jax.train.export import export_params
    step, written = export_params(Path(args.run_dir), Path(args.out), args.step, args.merge)
    print(f"{'exported' if written else 'already exported'} the params of step {step} to {args.out}; start from "
          f"them with --set checkpoint.init_from={args.out}")
    return 0


def _show_masks(args: argparse.Namespace) -> int:
    import itertools
    from llm_jax.config import data_dir
    from llm_jax.data.chat.dialogue import iter_dialogues
    from llm_jax.data.chat.template import render, show
    from llm_jax.data.tokenizer import Tokenizer
    from llm_jax.errors import ConfigError
    cfg = resolve(args)
    if not cfg.data.tokenizer:
        raise ConfigError("show-masks needs a tokenizer: --set checkpoint.init_from=EXPORT or data.tokenizer=PATH")
    tokenizer = Tokenizer.load(cfg.data.tokenizer)
    for n, dialogue in enumerate(itertools.islice(iter_dialogues(cfg.data.sources, data_dir(cfg)), args.n)):
        ids, mask = render(dialogue, tokenizer, max_len=cfg.data.seq_len + 1, template=cfg.data.chat_template)
        print(f"--- dialogue {n}: {len(ids)} tokens, {int(mask.sum())} trained on (in ⟦ ⟧)\n"
              f"{show(ids, mask, tokenizer)}")
    return 0
