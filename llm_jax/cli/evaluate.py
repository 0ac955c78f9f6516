"""`llm-jax eval | score | compare | compress | decompress`: what a trained model says about given text, and
which of two policies a reward model prefers."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llm_jax.cli.args import checkpoint_args, sampling_args, sampling_of


def add_commands(sub) -> None:
    ev = sub.add_parser("eval", help="bits per token / byte of a model on any text, beside gzip, bz2 and xz")
    checkpoint_args(ev)
    ev.add_argument("--text", nargs="*", default=[], metavar="FILE", help="text files (.gz read gunzipped)")
    ev.add_argument("--jsonl", nargs="*", default=[], metavar="FILE", help="JSONL files: --field of every line")
    ev.add_argument("--field", default="text", help="the JSONL field holding the text")
    ev.add_argument("--context", type=int, help="window length in tokens (default: the checkpoint's data.seq_len)")
    ev.add_argument("--stride", type=int, help="tokens between window starts (default: context / 2)")
    ev.add_argument("--prime", nargs="*", metavar="FILE",
                    help="also report each compressor primed with these text files (.gz read gunzipped), as the "
                         "model has read its training text; default: the run's training text when its prepared "
                         "data is still there; --prime alone: none")
    ev.add_argument("--json", action="store_true", help="print the figures as JSON")
    ev.set_defaults(fn=_eval)
    score = sub.add_parser("score", help="rewards from a reward model for responses or pairs in a JSONL file")
    checkpoint_args(score, "a reward-model run directory (its latest checkpoint) or an `llm-jax export` of one")
    score.add_argument("--input", required=True, help="JSONL of {prompt, response} or {prompt, chosen, rejected} "
                                                      "(or hh-rlhf {chosen, rejected}) lines")
    score.add_argument("--output", help="write one JSON line of rewards per input line here (default: stdout)")
    score.add_argument("--batch-size", type=int, default=32)
    score.set_defaults(fn=_score)
    _compare_args(sub)
    for name, fn, what in (("compress", _compress, "compress a file losslessly with a model (arithmetic coding)"),
                           ("decompress", _decompress, "restore a file made by `compress` (same checkpoint)")):
        cmd = sub.add_parser(name, help=what)
        checkpoint_args(cmd)
        cmd.add_argument("input")
        cmd.add_argument("output")
        if name == "compress":
            cmd.add_argument("--context", type=int, help="tokens per window (default: the checkpoint's data.seq_len)")
        cmd.set_defaults(fn=fn)


def _compare_args(sub) -> None:
    cmp = sub.add_parser(
        "compare", help="judge a policy against a baseline with a reward model on held-out prompts",
        description="Both language models answer the same held-out prompts with the same sampling settings and "
        "seed; the judge scores the answers. Reports the policy's win rate (a tie counts half) with a 95% "
        "percentile-bootstrap interval over prompts, each model's mean normalised reward and answer length, and "
        "the KL of the policy to the baseline on the policy's answers (unbiased only at temperature 1 without "
        "top-k/top-p, the defaults).")
    what = "a run directory (its latest checkpoint) or an `llm-jax export` of a "
    cmp.add_argument("--policy", required=True, metavar="A", help=what + "language model: the one judged")
    cmp.add_argument("--baseline", required=True, metavar="B", help=what + "language model with A's tokenizer")
    cmp.add_argument("--judge", required=True, metavar="RM", help=what + "reward model")
    cmp.add_argument("--prompts", required=True, metavar="SOURCE[,SOURCE...]",
                     help="prompt sources (hh:, pairs:, qa_feedback:, alpaca:, chat:, prompts:GLOB): their held-out "
                          "prompts, split as reward-model, DPO and RL training split them")
    cmp.add_argument("--samples", type=int, default=64, metavar="N", help="how many held-out prompts (the first N)")
    sampling_args(cmp, max_tokens=128, temperature=1.0)
    cmp.add_argument("--eval-fraction", type=float, default=0.1,
                     help="the data.eval_fraction of the split that holds the prompts out")
    cmp.add_argument("--data-dir", help="where GLOBs are looked up (default: $LLM_JAX_DATA, else ../shared/data)")
    cmp.add_argument("--batch-size", type=int, default=16, help="prompts generated and scored at once")
    cmp.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    cmp.add_argument("--out", metavar="FILE", help="write one JSON line per prompt: the prompt, both answers "
                                                    "and their rewards")
    cmp.set_defaults(fn=_compare)


def _eval(args: argparse.Namespace) -> int:
    from llm_jax.evaluation.text import evaluate_texts, format_report, primer_of, read_texts, report
    from llm_jax.inference.runner import ModelRunner
    texts = [text for _, text in read_texts(args.text, args.jsonl, args.field)]
    cfg, runner, tokenizer = ModelRunner.load(Path(args.checkpoint), args.step)
    primer, source = primer_of(args.prime, Path(args.checkpoint), cfg)
    context = args.context or cfg.data.seq_len
    totals = evaluate_texts(runner, tokenizer, texts, context, args.stride or max(1, context // 2))
    print(format_report(report(totals, [tokenizer.scored_bytes(t) for t in texts], primer, source), args.json))
    return 0


def _score(args: argparse.Namespace) -> int:
    from llm_jax.inference.score import describe, score_file
    summary = score_file(Path(args.checkpoint), Path(args.input), Path(args.output) if args.output else None,
                         args.step, args.batch_size)
    # With the scores on stdout, the summary goes to stderr so that the JSONL stays clean.
    print(describe(summary), file=sys.stderr if args.output is None else sys.stdout, flush=True)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from llm_jax.config import Config, data_dir
    from llm_jax.inference.compare import compare, format_report, kl_warning, parse_sources, write_answers
    sampling = sampling_of(args)
    summary, rows = compare(Path(args.policy), Path(args.baseline), Path(args.judge), parse_sources(args.prompts),
                            Path(args.data_dir) if args.data_dir else data_dir(Config()), samples=args.samples,
                            max_tokens=args.max_tokens, sampling=sampling, seed=args.seed,
                            eval_fraction=args.eval_fraction, batch_size=args.batch_size)
    if args.out:
        write_answers(Path(args.out), rows)
    if kl_warning(sampling):
        print(f"llm-jax: warning: {kl_warning(sampling)}", file=sys.stderr)
    print(format_report(summary, args.json))
    return 0


def _compress(args: argparse.Namespace) -> int:
    from llm_jax.inference.codec import compress_file
    r = compress_file(Path(args.checkpoint), Path(args.input), Path(args.output), args.step, args.context)
    print(f"{r['input_bytes']:,} bytes -> {r['output_bytes']:,} bytes ({r['bits_per_byte']:.3f} bits/byte; the model's "
          f"cross-entropy is {r['model_bits_per_byte']:.3f} bits/byte, {r['header_bytes']} header bytes), "
          f"{r['tokens']:,} tokens in {r['seconds']:.1f} s")
    return 0


def _decompress(args: argparse.Namespace) -> int:
    from llm_jax.inference.codec import decompress_file
    r = decompress_file(Path(args.checkpoint), Path(args.input), Path(args.output), args.step)
    print(f"{r['input_bytes']:,} bytes -> {r['output_bytes']:,} bytes in {r['seconds']:.1f} s")
    return 0
