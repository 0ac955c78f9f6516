"""Next-token pretraining on documents: windows of a tokenized corpus, every target counted.

Data: data/prepare.py tokenizes the corpus once (sources of data/corpus.py) into token shards; data/pipeline.py
cuts them into packed windows. Objective: the summed nats of every target (tasks/losses.py), reported as
bits per token and bits per byte. gzip, bz2 and xz compress exactly the held-out bytes the model is scored on,
alone and primed with the training text (evaluation/baselines.py), for comparison: as reference lines beside
the eval curve from the start and in the table at the end (computed once, cached in the prepared directory).
"""
from __future__ import annotations

from pathlib import Path

from llm_jax.data import corpus, pipeline
from llm_jax.data.batches import TokenBatch
from llm_jax.data.prepare import Prepared, prepare
from llm_jax.evaluation import baselines
from llm_jax.tasks import losses
from llm_jax.tasks.base import Evaluation, Summary, Task


class NextToken(Task):
    """What every task that predicts tokens shares: the objective and its scalars."""
    batch_type = TokenBatch
    loss, count = "objective", "tokens"  # the objective: nats, plus the z-loss when train.z_loss is set
    counts = ("tokens", "bytes")
    progress = ("bpb", "train/bits_per_byte")
    summary_scalars = (("train/loss_bits_per_token", "train bits/token"), ("train/bits_per_byte", "train bits/byte"),
                       ("eval/bits_per_token", "eval bits/token"), ("eval/bits_per_byte", "eval bits/byte"))

    def sums(self, model, params, batch: TokenBatch, frozen: dict) -> dict:
        return losses.next_token_sums(model, params, batch, self.cfg.train.z_loss)

    def scalars(self, sums: dict, prefix: str) -> dict:
        rates = losses.compression_rates(sums)
        loss_name = "loss_bits_per_token" if prefix == "train" else "bits_per_token"
        return {f"{prefix}/{loss_name}": rates["bits_per_token"], f"{prefix}/bits_per_byte": rates["bits_per_byte"]}


class Pretrain(NextToken):
    name = "pretrain"
    source_kinds = corpus.KINDS
    prepared_type = Prepared

    def prepare(self, out_dir: Path) -> None:
        prepare(self.cfg, out_dir)

    def describe(self, data: Prepared) -> str:
        return f"{len(data.tokens('train')):,} train / {len(data.tokens('eval')):,} eval tokens"

    def reference_lines(self, data: Prepared) -> dict[str, dict[str, float]]:
        """The compressors, alone and primed, on the held-out bytes that every evaluation scores."""
        windows = self.cfg.train.eval_batches * self.cfg.train.batch_size or len(self.rows(data, "eval"))
        held_out = pipeline.eval_text(data, self.cfg.data.seq_len, windows)
        return {name: {"eval/bits_per_byte": bpb} for name, bpb in _baselines(data, held_out).items()}

    def finish(self, data: Prepared, evaluation: Evaluation) -> Summary:
        """The compressors on exactly the held-out bytes the model was scored on (the last batch may be
        padded: only windows that exist count)."""
        seq_len, sums = self.cfg.data.seq_len, evaluation.sums
        held_out = pipeline.eval_text(data, seq_len, evaluation.n_batches * self.cfg.train.batch_size)
        if len(held_out) != int(sums["bytes"]):
            raise RuntimeError(f"held-out text has {len(held_out)} bytes but the model was scored on "
                               f"{int(sums['bytes'])}: the byte table and the data disagree")
        rates = _baselines(data, held_out)
        text = (f"\nheld-out split: {len(held_out):,} bytes, {int(sums['tokens']):,} tokens; primed: after "
                f"the training text\n" + baselines.format_comparison(evaluation.scores["eval/bits_per_byte"], rates))
        return Summary({"baselines_bits_per_byte": rates},
                       {f"compare/{k}_bits_per_byte": v for k, v in rates.items()}, text)


def _baselines(data: Prepared, held_out: bytes) -> dict[str, float]:
    """The compressors on held_out, alone and primed with the training text, cached beside the data."""
    return baselines.cached(held_out, data.text_tail("train", baselines.XZ_DICTIONARY), data.path)
