"""`llm-jax <command>`: resolves an experiment, applies `--set` overrides, runs.

Errors a user can fix (config, mesh, data, run directory, checkpoint) are printed as one line and exit
with 2; a preempted run (SIGTERM/SIGINT, checkpoint saved) exits with 75, a non-finite loss under
train.nonfinite=stop with 3.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llm_jax.config import ConfigError, apply_overrides, load_experiment, validate


def _experiment_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True,
                        help="experiment file (experiments/pretrain_tiny.py) or its name (pretrain_tiny)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set model.n_layers=4 (repeatable)")
    parser.add_argument("--data-dir", help="where the shared data sets live (sets data.data_dir)")


def _resolve(args):
    cfg = load_experiment(args.config)
    overrides = list(args.overrides)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    return validate(apply_overrides(cfg, overrides))


def _cmd_train(args) -> int:
    from llm_jax.distributed import initialize
    from llm_jax.loop import train
    cfg = _resolve(args)
    initialize(args.coordinator, args.num_processes, args.process_id)
    run_dir = Path(args.run_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    train(cfg, run_dir, fresh=args.fresh)
    import jax
    if jax.process_index() == 0:
        print(f"run directory: {run_dir}   (tensorboard --logdir {run_dir})")
    return 0


def _cmd_prepare(args) -> int:
    from llm_jax.data.prepare import prepare
    cfg = _resolve(args)
    prepare(cfg, Path(args.out))
    print(f"prepared data in {args.out}; train on it with --set data.prepared={args.out}")
    return 0


def _cmd_export(args) -> int:
    from llm_jax.checkpoint import export_params
    step = export_params(Path(args.run_dir), Path(args.out), args.step)
    print(f"exported the params of step {step} to {args.out}; start from them with "
          f"--set checkpoint.init_from={args.out}")
    return 0


def _cmd_show_masks(args) -> int:
    import itertools
    from llm_jax.config import data_dir
    from llm_jax.data.chat_template import render, show
    from llm_jax.data.dialogue import iter_dialogues
    from llm_jax.data.tokenizer import Tokenizer
    from llm_jax.loop import with_init_from
    cfg = with_init_from(_resolve(args))
    if not cfg.data.tokenizer:
        raise ConfigError("show-masks needs a tokenizer: --set checkpoint.init_from=EXPORT or data.tokenizer=PATH")
    tokenizer = Tokenizer.load(cfg.data.tokenizer)
    for n, dialogue in enumerate(itertools.islice(iter_dialogues(cfg.data.sources, data_dir(cfg)), args.n)):
        ids, mask = render(dialogue, tokenizer, max_len=cfg.data.seq_len + 1)
        print(f"--- dialogue {n}: {len(ids)} tokens, {int(mask.sum())} trained on (in ⟦ ⟧)\n{show(ids, mask, tokenizer)}")
    return 0


def _generator(args):
    from llm_jax.checkpoint import load_for_inference
    from llm_jax.generate import Generator, Sampling
    cfg, params, tokenizer = load_for_inference(Path(args.checkpoint), args.step)
    if cfg.model.head != "lm":
        raise ConfigError(f"{args.checkpoint} is a reward model (model.head={cfg.model.head}): it scores answers "
                          "(llm-jax score), it does not generate")
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    return Generator(cfg.model, params, sampling), tokenizer


def _cmd_sample(args) -> int:
    from llm_jax.chat import sample
    generator, tokenizer = _generator(args)
    sample(generator, tokenizer, args.prompt, args.max_tokens, args.seed)
    return 0


def _cmd_chat(args) -> int:
    from llm_jax.chat import chat
    generator, tokenizer = _generator(args)
    chat(generator, tokenizer, args.max_tokens, args.seed, system=args.system)
    return 0


def _cmd_score(args) -> int:
    from llm_jax.score import describe, score_file
    summary = score_file(Path(args.checkpoint), Path(args.input), Path(args.output) if args.output else None,
                         args.step, args.batch_size)
    # With the scores on stdout, the summary goes to stderr so that the JSONL stays clean.
    print(describe(summary), file=sys.stderr if args.output is None else sys.stdout, flush=True)
    return 0


def _cmd_bench(args) -> int:
    from llm_jax import bench
    cfg = _resolve(args)
    if args.what == "train":
        result = bench.bench_train(cfg, args.steps, args.warmup, args.real_data, args.profile)
        print(f"bench train {cfg.name}\n{bench.format_train(result)}")
        if args.profile:
            print(f"profile: tensorboard --logdir {args.profile}  (Profile tab)")
        if args.compare_torch:
            ref = bench.torch_reference().tokens_per_sec(cfg.model, cfg.optim, cfg.train.batch_size,
                                                         cfg.data.seq_len, steps=args.steps, warmup=args.warmup)
            # In this process, so under the same malloc settings as llm_jax (runtime.py).
            print(f"PyTorch eager reference (benchmarks/torch_reference.py, CPU, {ref['threads']} threads): "
                  f"{ref['tokens_per_sec']:,.0f} tokens/s, {ref['step_time_s'] * 1e3:.1f} ms/step, "
                  f"{ref['params']:,} parameters")
            print(f"llm_jax/torch tokens/s ratio: {result['tokens_per_sec'] / ref['tokens_per_sec']:.2f}")
    elif args.what == "data":
        r = bench.bench_data(cfg, args.steps)
        print(f"bench data {cfg.name}: {r['tokens_per_sec']:,.0f} tokens/s ({r['batch_ms']:.2f} ms per global batch "
              f"of {cfg.train.batch_size}×{cfg.data.seq_len}, {r['batches']} batches)")
    elif args.what == "memory":
        print(f"bench memory {cfg.name} (seq {cfg.data.seq_len}, {cfg.train.microbatches} microbatches)\n"
              f"{bench.format_memory(bench.bench_memory(cfg, args.limit_gib))}")
    elif args.what == "generate":
        for batch, rate in bench.bench_generate(cfg).items():
            print(f"bench generate {cfg.name}: batch {batch:>2}: {rate:,.0f} tokens/s (KV cache, greedy)")
    else:
        r = bench.bench_checkpoint(cfg)
        print(f"bench checkpoint {cfg.name}: {r['bytes'] / 2**20:.1f} MiB state; a save holds the step up "
              f"{r['held_s'] * 1e3:.0f} ms ({'async' if r['async'] else 'sync'}), the whole write takes "
              f"{r['whole_s'] * 1e3:.0f} ms")
    return 0


def _cmd_eval(args) -> int:
    from llm_jax.checkpoint import load_for_inference
    from llm_jax.evaluate import evaluate_texts, format_report, read_texts, report
    texts = [text for _, text in read_texts(args.text, args.jsonl, args.field)]
    cfg, params, tokenizer = load_for_inference(Path(args.checkpoint), args.step)
    context = args.context or cfg.data.seq_len
    totals = evaluate_texts(cfg, params, tokenizer, texts, context, args.stride or max(1, context // 2))
    print(format_report(report(totals, texts), args.json))
    return 0


def _cmd_compress(args) -> int:
    from llm_jax.compress import compress_file
    r = compress_file(Path(args.checkpoint), Path(args.input), Path(args.output), args.step, args.context)
    print(f"{r['input_bytes']:,} bytes -> {r['output_bytes']:,} bytes ({r['bits_per_byte']:.3f} bits/byte; the model's "
          f"cross-entropy is {r['model_bits_per_byte']:.3f} bits/byte, {r['header_bytes']} header bytes), "
          f"{r['tokens']:,} tokens in {r['seconds']:.1f} s")
    return 0


def _cmd_decompress(args) -> int:
    from llm_jax.compress import decompress_file
    r = decompress_file(Path(args.checkpoint), Path(args.input), Path(args.output), args.step)
    print(f"{r['input_bytes']:,} bytes -> {r['output_bytes']:,} bytes in {r['seconds']:.1f} s")
    return 0


def _cmd_import_hf(args) -> int:
    from llm_jax.hf import import_hf
    cfg = import_hf(Path(args.hf_dir), Path(args.out), Path(args.tokenizer) if args.tokenizer else None)
    m = cfg.model
    print(f"imported a {m.n_layers}-layer, {m.d_model}-wide model (vocab {m.vocab_size}) into {args.out}; use it with "
          f"--checkpoint {args.out} or --set checkpoint.init_from={args.out}")
    return 0


def _cmd_export_hf(args) -> int:
    from llm_jax.hf import export_hf
    export_hf(Path(args.checkpoint), Path(args.out))
    print(f"wrote a Hugging Face checkpoint to {args.out} (transformers.AutoModelForCausalLM.from_pretrained)")
    return 0


def _cmd_sweep(args) -> int:
    from llm_jax.sweep import run_sweep
    options = {k: v for k, v in vars(args).items() if k in _LAUNCHER_OPTIONS and v is not None}
    return run_sweep(args.sweep, args.launcher, sweep_dir=Path(args.sweep_dir) if args.sweep_dir else None,
                     dry_run=args.dry_run, parallel=args.parallel, launcher_options=options,
                     extra_overrides=args.overrides)


def _cmd_report(args) -> int:
    from llm_jax.report import write_report
    print(f"report: {write_report(Path(args.sweep_dir))}")
    return 0


# Options of the launchers in llm_jax/launch.py that a sweep passes through (unset ones are left out).
_LAUNCHER_OPTIONS = ("num_processes", "devices_per_process", "port", "nodes", "gpus_per_node", "tasks",
                     "cpus_per_task", "time", "partition", "account", "setup", "log_dir", "tpu_name", "zone",
                     "project", "accelerator_type", "queued", "repo_url_or_dir", "runtime_version")


def _sweep_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="sweep file (experiments/sweeps/layers_tiny.py) or its name (layers_tiny)")
    parser.add_argument("--launcher", default="local", choices=("local", "local-multiprocess", "slurm", "tpu"))
    parser.add_argument("--sweep-dir", help="where the runs go (default: runs/sweeps/<sweep name>)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run and write nothing")
    parser.add_argument("--parallel", type=int, default=1, help="local launcher: runs at a time")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every point (repeatable)")
    group = parser.add_argument_group("launcher options", "as for launch/<kind> (see llm_jax/launch.py)")
    for name, typ in (("num_processes", int), ("devices_per_process", int), ("port", int), ("nodes", int),
                      ("gpus_per_node", int), ("cpus_per_task", int), ("tasks", str), ("time", str),
                      ("partition", str), ("account", str), ("setup", str), ("log_dir", str), ("tpu_name", str),
                      ("zone", str), ("project", str), ("accelerator_type", str), ("runtime_version", str)):
        group.add_argument("--" + name.replace("_", "-"), type=typ, default=None)
    group.add_argument("--repo", dest="repo_url_or_dir", default=None, help="tpu: git URL or local checkout")
    group.add_argument("--queued", action="store_true", default=None, help="tpu: request a queued resource")


def _generation_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="a run directory (its latest checkpoint) or an `llm-jax export` directory")
    parser.add_argument("--step", type=int, help="checkpoint step of a run directory (default: the latest)")
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: off")
    parser.add_argument("--seed", type=int, default=0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llm-jax", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="pretrain a model from an experiment config")
    _experiment_args(train)
    train.add_argument("--run-dir", help="where TensorBoard logs, checkpoints, config and results go "
                                         "(default: runs/<name>-<time>); an existing run there is resumed")
    train.add_argument("--fresh", action="store_true", help="delete the run in --run-dir and start over")
    group = train.add_argument_group("multi-process", "one job over several processes (launch/local-multiprocess "
                                     "passes these; SLURM and TPU pods are detected, see llm_jax/distributed.py)")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordination service")
    group.add_argument("--num-processes", type=int, help="processes in the job")
    group.add_argument("--process-id", type=int, help="this process's index, 0 .. num-processes - 1")
    train.set_defaults(fn=_cmd_train)
    prep = sub.add_parser("prepare", help="tokenize an experiment's corpus once into binary shards")
    _experiment_args(prep)
    prep.add_argument("--out", required=True, help="output directory")
    prep.set_defaults(fn=_cmd_prepare)
    export = sub.add_parser("export", help="write the params of a checkpoint for init_from / inference")
    export.add_argument("--run-dir", required=True, help="a training run directory")
    export.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    export.add_argument("--out", required=True, help="output directory (must not exist)")
    export.set_defaults(fn=_cmd_export)
    masks = sub.add_parser("show-masks", help="print SFT examples with the tokens trained on marked")
    _experiment_args(masks)
    masks.add_argument("--n", type=int, default=3, help="how many dialogues")
    masks.set_defaults(fn=_cmd_show_masks)
    sample = sub.add_parser("sample", help="continue a prompt, streaming the tokens")
    _generation_args(sample, max_tokens=200)
    sample.add_argument("--prompt", required=True)
    sample.set_defaults(fn=_cmd_sample)
    chat = sub.add_parser("chat", help="talk with a model in the terminal through the chat template")
    _generation_args(chat, max_tokens=256)
    chat.add_argument("--system", default="", help="an optional system message")
    chat.set_defaults(fn=_cmd_chat)
    score = sub.add_parser("score", help="rewards from a reward model for responses or pairs in a JSONL file")
    score.add_argument("--checkpoint", required=True,
                       help="a reward-model run directory (its latest checkpoint) or an `llm-jax export` of one")
    score.add_argument("--step", type=int, help="checkpoint step of a run directory (default: the latest)")
    score.add_argument("--input", required=True, help="JSONL of {prompt, response} or {prompt, chosen, rejected} "
                                                      "(or hh-rlhf {chosen, rejected}) lines")
    score.add_argument("--output", help="write one JSON line of rewards per input line here (default: stdout)")
    score.add_argument("--batch-size", type=int, default=32)
    score.set_defaults(fn=_cmd_score)
    ev = sub.add_parser("eval", help="bits per token / byte of a model on any text, beside gzip, bz2 and xz")
    ev.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or an export")
    ev.add_argument("--step", type=int, help="checkpoint step of a run directory (default: the latest)")
    ev.add_argument("--text", nargs="*", default=[], metavar="FILE", help="text files (.gz read gunzipped)")
    ev.add_argument("--jsonl", nargs="*", default=[], metavar="FILE", help="JSONL files: --field of every line")
    ev.add_argument("--field", default="text", help="the JSONL field holding the text")
    ev.add_argument("--context", type=int, help="window length in tokens (default: the checkpoint's data.seq_len)")
    ev.add_argument("--stride", type=int, help="tokens between window starts (default: context / 2)")
    ev.add_argument("--json", action="store_true", help="print the figures as JSON")
    ev.set_defaults(fn=_cmd_eval)
    for name, fn, what in (("compress", _cmd_compress, "compress a file losslessly with a model (arithmetic coding)"),
                           ("decompress", _cmd_decompress, "restore a file made by `compress` (same checkpoint)")):
        cmd = sub.add_parser(name, help=what)
        cmd.add_argument("--checkpoint", required=True, help="a run directory (its latest checkpoint) or an export")
        cmd.add_argument("--step", type=int, help="checkpoint step of a run directory (default: the latest)")
        cmd.add_argument("input")
        cmd.add_argument("output")
        if name == "compress":
            cmd.add_argument("--context", type=int, help="tokens per window (default: the checkpoint's data.seq_len)")
        cmd.set_defaults(fn=fn)
    imp = sub.add_parser("import-hf", help="a local Hugging Face GPT-2 / Llama checkpoint (safetensors) -> export dir")
    imp.add_argument("hf_dir", help="directory with config.json and *.safetensors (pickle files are refused)")
    imp.add_argument("out", help="the llm_jax export directory to write (must not exist)")
    imp.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json (default: the one in hf_dir)")
    imp.set_defaults(fn=_cmd_import_hf)
    exp = sub.add_parser("export-hf", help="an llm_jax export (or run) directory -> a Hugging Face checkpoint")
    exp.add_argument("checkpoint", help="an `llm-jax export` or run directory")
    exp.add_argument("out", help="directory to write config.json, model.safetensors and the tokenizer into")
    exp.set_defaults(fn=_cmd_export_hf)
    bench = sub.add_parser("bench", help="time the train step, the data pipeline, decoding or checkpointing")
    bench.add_argument("what", choices=("train", "data", "generate", "checkpoint", "memory"))
    _experiment_args(bench)
    bench.add_argument("--steps", type=int, default=20, help="timed steps (data: batches)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps after the compiling one")
    bench.add_argument("--real-data", action="store_true", help="train: batches from the pipeline, not synthetic")
    bench.add_argument("--profile", metavar="DIR", help="train: write a jax.profiler trace of the timed steps")
    bench.add_argument("--limit-gib", type=float,
                       help="memory: per-device memory to fit in (default: the device's limit; CPU: host memory)")
    bench.add_argument("--compare-torch", action="store_true",
                       help="train: also time the PyTorch eager reference of the same model (pip install -e '.[torch]')")
    bench.set_defaults(fn=_cmd_bench)
    sweep = sub.add_parser("sweep", help="train an experiment at every point of a sweep file (resumable)")
    _sweep_args(sweep)
    sweep.set_defaults(fn=_cmd_sweep)
    report = sub.add_parser("report", help="Markdown table and plots of a sweep's runs")
    report.add_argument("sweep_dir", help="the sweep directory (runs/sweeps/<name>)")
    report.set_defaults(fn=_cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Orbax reports every save and restore through absl at INFO/WARNING; the CLI prints what matters.
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
    # Imported late so that a config error is reported without paying for JAX's import.
    from llm_jax.checkpoint import CheckpointError
    from llm_jax.data.corpus import DataError
    from llm_jax.hf import HFError
    from llm_jax.launch import LaunchError
    from llm_jax.loop import NONFINITE_EXIT, NonFiniteError, RunDirError
    from llm_jax.preemption import PREEMPTED_EXIT, Preempted
    from llm_jax.sharding import MeshError
    try:
        return args.fn(args)
    except (ConfigError, DataError, MeshError, RunDirError, CheckpointError, LaunchError, HFError) as e:
        print(f"llm-jax: error: {e}", file=sys.stderr)
        return 2
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
