"""`llm-jax score`: rewards from a trained reward model for the answers in a JSONL file.

Each line is one of
  {"prompt": P, "response": answer}                    one answer to score
  {"messages": [..., {"role": "assistant", ...}]}      the last (assistant) message is the answer
  {"prompt": P, "chosen": a, "rejected": b}            a pair (P as text or messages; optional "margin")
  {"chosen": transcript, "rejected": transcript}       an hh-rlhf pair
Sequences are rendered and truncated exactly as in training (data/chat/preference.py). When the checkpoint holds
its eval reward mean and std (saved at the end of training), rewards are normalised to (r - mean) / std, so
0 is an average answer of the eval set and 1 is one standard deviation above it; raw rewards come too.
Pair accuracy counts a tie as half, as training does.
"""
from __future__ import annotations

import collections
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from llm_jax.atomic import write_atomic
from llm_jax.data.batches import positions_from_segments
from llm_jax.data.chat.dialogue import Message, dialogue_problem
from llm_jax.data.chat.pairs import Pair, parse_pair, prompt_messages
from llm_jax.data.chat.preference import render_answers
from llm_jax.data.corpus import jsonl_records
from llm_jax.errors import DataError
from llm_jax.inference.runner import ModelRunner
from llm_jax.train.export import saved_eval

ROW_AXES = ("batch", "length")


class Scorer:
    """Jitted rewards of token sequences (each at most seq_len), through the model's runner."""

    def __init__(self, runner: ModelRunner, seq_len: int, batch_size: int = 32, template: str = ""):
        self.runner, self.seq_len, self.template = runner, seq_len, template  # the reward model's chat template
        self.batch_size = runner.round_rows(batch_size)  # whole rows per device
        model = runner.model()
        self._forward = runner.jit_batch(lambda p, rows: model.apply({"params": p}, *rows), (ROW_AXES,) * 3)

    def rewards(self, sequences: list[np.ndarray], pad_id: int) -> np.ndarray:
        out = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start:start + self.batch_size]
            tokens = np.full((self.batch_size, self.seq_len), pad_id, np.int32)
            segments = np.zeros_like(tokens)
            for row, ids in enumerate(chunk):
                tokens[row, :len(ids)], segments[row, :len(ids)] = ids, 1
            rows = (tokens, positions_from_segments(segments), segments)
            out.append(np.asarray(self._forward(self.runner.params, rows))[:len(chunk)])
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def answer_rewards(self, items: list[tuple[tuple[Message, ...], list[str]]], tokenizer) -> list[list[float]]:
        """Raw rewards of the answers of each (prompt, answers) item, rendered as in training (render_answers:
        one prompt cut for all the answers of an item)."""
        sequences, counts = [], []
        for prompt, answers in items:
            sequences += render_answers(prompt, answers, tokenizer, self.seq_len, self.template)
            counts.append(len(answers))
        raw, out = self.rewards(sequences, tokenizer.pad_id).tolist(), []
        for n in counts:
            out.append(raw[:n])
            raw = raw[n:]
        return out


def eval_normaliser(checkpoint: Path, step: int | None = None) -> tuple[Callable[[float], float], float | None,
                                                                         float | None]:
    """(normalise, mean, std): r -> (r - mean) / std with the eval reward statistics a reward model's checkpoint
    or export holds (saved at the end of training); the identity, with mean and std None, when it holds none."""
    stats = saved_eval(Path(checkpoint), step)
    mean, std = stats.get("eval/reward_mean"), stats.get("eval/reward_std")
    if mean is None or not std:
        return (lambda r: r), None, None
    return (lambda r: (r - mean) / std), mean, std


def read_items(path: Path) -> list[tuple[int, object]]:
    """(line, item) for each line of a JSONL file (see parse_item)."""
    if not path.is_file():
        raise DataError(f"--input {path}: no such file")
    return [(lineno, parse_item(record, f"{path}:{lineno}")) for lineno, record in jsonl_records(path)]


def parse_item(record, where: str):
    """A Pair, a (prompt, answer) response, or the reason a pair is unusable, from one record of a score input
    (a JSONL line, or an element of the server's /v1/score input); a malformed record is a DataError at `where`."""
    if isinstance(record, dict) and "response" in record:
        if not isinstance(record["response"], str):
            raise DataError(f"{where}: 'response' must be a string")
        return _response(prompt_messages(record.get("prompt"), where), record["response"])
    if isinstance(record, dict) and "messages" in record:
        messages = prompt_messages(record["messages"], where)
        if not messages or messages[-1].role != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer to score")
        return _response(messages[:-1], messages[-1].content)
    if isinstance(record, dict) and {"chosen", "rejected"} <= record.keys():
        return parse_pair(record, where)
    raise DataError(f"{where}: expected {{prompt, response}}, {{messages}}, {{prompt, chosen, rejected}} "
                    "or {chosen, rejected}")


def _response(prompt: tuple[Message, ...], answer: str) -> tuple[tuple[Message, ...], str] | str:
    answer = answer.strip()
    return dialogue_problem([*prompt, Message("assistant", answer)]) or (prompt, answer)


def score_file(checkpoint: Path, input_path: Path, output: Path | None, step: int | None = None,
               batch_size: int = 32) -> dict:
    """Scores every line of input_path; writes one JSON line per input line; returns the summary."""
    items = read_items(Path(input_path))
    cfg, runner, tokenizer = ModelRunner.load(Path(checkpoint), step, head="reward")
    scorer = Scorer(runner, cfg.data.seq_len, batch_size, cfg.data.chat_template)
    lines, summary = score_items(scorer, tokenizer, eval_normaliser(Path(checkpoint), step), items)
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if output is None:
        sys.stdout.write(text)
    else:
        write_atomic(output, text)
    return summary


def score_items(scorer: Scorer, tokenizer, normaliser, items: list[tuple[int, object]]) -> tuple[list[dict], dict]:
    """(one result per (line, item), the summary), rewards normalised by eval_normaliser's triple."""
    normalise, mean, std = normaliser
    scored = [i for i, (_, item) in enumerate(items) if not isinstance(item, str)]
    rewards = scorer.answer_rewards([(item.prompt, [item.chosen, item.rejected]) if isinstance(item, Pair) else
                                     (item[0], [item[1]]) for item in (items[i][1] for i in scored)], tokenizer)
    per_item = collections.defaultdict(list, zip(scored, rewards))

    lines, skipped, correct, n_pairs, n_responses = [], collections.Counter(), 0.0, 0, 0
    for i, (lineno, item) in enumerate(items):
        if isinstance(item, str):
            skipped[item] += 1
            lines.append({"line": lineno, "skipped": item})
        elif len(per_item[i]) == 2:
            rc, rr = per_item[i]
            n_pairs += 1
            correct += 1.0 if rc > rr else 0.5 if rc == rr else 0.0
            lines.append({"line": lineno, "reward_chosen": normalise(rc), "reward_rejected": normalise(rr),
                          "raw_reward_chosen": rc, "raw_reward_rejected": rr,
                          "preferred": "chosen" if rc > rr else "tie" if rc == rr else "rejected"})
        else:
            n_responses += 1
            lines.append({"line": lineno, "reward": normalise(per_item[i][0]), "raw_reward": per_item[i][0]})
    return lines, {"responses": n_responses, "pairs": n_pairs, "accuracy": correct / n_pairs if n_pairs else None,
                   "skipped": dict(skipped), "normalised": mean is not None, "reward_mean": mean,
                   "reward_std": std}


def describe(summary: dict) -> str:
    parts = [f"scored {summary['responses']} responses and {summary['pairs']} pairs"]
    if summary["skipped"]:
        parts.append(f"skipped {sum(summary['skipped'].values())} ({', '.join(f'{k}: {v}' for k, v in summary['skipped'].items())})")
    if summary["accuracy"] is not None:
        parts.append(f"pair accuracy {summary['accuracy']:.1%} (ties count half)")
    parts.append(f"rewards normalised by the eval mean {summary['reward_mean']:+.4f} and std {summary['reward_std']:.4f}"
                 if summary["normalised"] else "raw rewards (the checkpoint holds no eval reward statistics)")
    return "; ".join(parts)
