"""`llm-jax bench | sweep | report | pipeline`: speed and memory, sweeps of runs and their reports, and the
whole recipe (pretrain → SFT → reward model → RL/DPO → evaluation) as one resumable command."""
from __future__ import annotations

import argparse
from pathlib import Path

from llm_jax.cli.args import experiment_args, resolve
from llm_jax.launch.main import add_sweep_options


def add_commands(sub) -> None:
    bench = sub.add_parser("bench", help="time the train step, the data pipeline, decoding or checkpointing")
    bench.add_argument("what", choices=("train", "data", "generate", "checkpoint", "memory"))
    experiment_args(bench)
    bench.add_argument("--steps", type=int, default=20, help="timed steps (data: batches)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps after the compiling one")
    bench.add_argument("--real-data", action="store_true", help="train: batches from the pipeline, not synthetic")
    bench.add_argument("--profile", metavar="DIR", help="train: write a jax.profiler trace of the timed steps")
    bench.add_argument("--limit-gib", type=float,
                       help="memory: per-device memory to fit in (default: the device's limit; CPU: host memory)")
    bench.add_argument("--compare-torch", action="store_true",
                       help="train: also time the PyTorch eager reference of the same model "
                            "(pip install -e '.[torch]')")
    bench.set_defaults(fn=_bench)
    sweep = sub.add_parser("sweep", help="train an experiment at every point of a sweep file (resumable)")
    _sweep_args(sweep)
    sweep.set_defaults(fn=_sweep)
    report = sub.add_parser("report", help="Markdown table and plots of a sweep's runs")
    report.add_argument("sweep_dir", help="the sweep directory (runs/sweeps/<name>)")
    report.set_defaults(fn=_report)
    pipeline = sub.add_parser("pipeline", help="run a pipeline's stages in order (resumable), then its report card")
    pipeline.add_argument("pipeline", help="pipeline file (experiments/pipelines/instructgpt_tiny.py) or its name")
    pipeline.add_argument("--launcher", default="local", choices=("local", "local-multiprocess", "slurm", "tpu"))
    pipeline.add_argument("--pipeline-dir", help="where the stages go (default: runs/pipelines/<pipeline name>)")
    pipeline.add_argument("--dry-run", action="store_true", help="validate every stage and print what would run")
    pipeline.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE.KEY=VALUE",
                          help="a stage's config key (sft.train.steps=50), a stage's enabled switch "
                          "(dpo.enabled=true), or a report-card setting (card.limit=100); repeatable")
    pipeline.set_defaults(fn=_pipeline, launcher_option_names=add_sweep_options(pipeline))


def _sweep_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep file (experiments/sweeps/layers_tiny.py) or its name (layers_tiny)")
    parser.add_argument("--launcher", default="local", choices=("local", "local-multiprocess", "slurm", "tpu"))
    parser.add_argument("--sweep-dir", help="where the runs go (default: runs/sweeps/<sweep name>)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run and write nothing")
    parser.add_argument("--parallel", type=int, default=1, help="local launcher: runs at a time")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every point (repeatable)")
    parser.set_defaults(launcher_option_names=add_sweep_options(parser))


def _bench(args: argparse.Namespace) -> int:
    from llm_jax.bench import io, memory, train
    cfg = resolve(args)
    if args.what == "train":
        print(train.run(cfg, args.steps, args.warmup, args.real_data, args.profile, args.compare_torch))
    elif args.what == "memory":
        print(memory.run(cfg, args.limit_gib))
    elif args.what == "data":
        print(io.run_data(cfg, args.steps))
    else:
        print({"generate": io.run_generate, "checkpoint": io.run_checkpoint}[args.what](cfg))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from llm_jax.sweep.run import run_sweep
    options = {name: getattr(args, name) for name in args.launcher_option_names if hasattr(args, name)}
    return run_sweep(args.sweep, args.launcher, sweep_dir=Path(args.sweep_dir) if args.sweep_dir else None,
                     dry_run=args.dry_run, parallel=args.parallel, launcher_options=options,
                     extra_overrides=args.overrides)


def _pipeline(args: argparse.Namespace) -> int:
    from llm_jax.pipeline.run import run_pipeline
    options = {name: getattr(args, name) for name in args.launcher_option_names if hasattr(args, name)}
    return run_pipeline(args.pipeline, args.launcher, pipeline_dir=Path(args.pipeline_dir) if args.pipeline_dir
                        else None, dry_run=args.dry_run, overrides=args.overrides, launcher_options=options)


def _report(args: argparse.Namespace) -> int:
    from llm_jax.sweep.report import write_report
    print(f"report: {write_report(Path(args.sweep_dir))}")
    return 0
