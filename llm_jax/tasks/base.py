"""A Task is one training algorithm: everything that differs between pretraining, SFT, a reward model and
what comes next (DPO, PPO, GRPO), so that the loop, the metrics, reports, bench and sweeps never ask which
kind of run they serve.

A task owns, for the config it was made from:
  data       prepare(out_dir) once on process 0 (tokenize, render, write arrays; reused when unchanged),
             load(dir), then train_source(...) for training and eval_batches(...) for the held-out split,
             batches of its own type (data/batches.py: TokenBatch, PairBatch, ...)
  model      head: what the decoder ends in ("lm": next-token logits, "reward": one scalar per sequence)
  objective  sums(model, params, batch) -> summed quantities, of which sums[loss] is minimised after
             division by the total sums[count] over all microbatches; scalars(sums, prefix) turns
             accumulated sums into TensorBoard scalars ("train/...", "eval/...")
  reporting  progress (label and scalar on the progress bar), describe(data) for the first line of a run,
             counts (what an evaluation scored, in results.json), summary_scalars (a sweep report's columns
             and the HParams metrics), reference_lines(data) (fixed values drawn beside the eval curve: the
             compressors), finish(data, evaluation) for its end (the compressor comparison, a reward
             summary), tokens_per_step and flops_per_token (MFU, training FLOPs)
It is chosen by one config key, `task`, so a config cannot pair one task's objective with another's data.

Adding a task: a module in tasks/ with a Task subclass and an entry in tasks/__init__.py's TASKS, plus what is
new about its data (a batch type in data/batches.py, a prepared_type) and its config (a section of config.py).
A task whose objective reads models it does not train (DPO's reference) names their exports in
frozen_exports(): they are loaded once, laid out like the trained params, and passed to `sums` as `frozen`.
The loop, step, metrics, reports, bench and sweeps need no change (docs/architecture.md; tasks/dpo.py is the
worked example).

Tasks whose batches the model itself produces (tasks/rl.py: PPO, GRPO, RLOO) plug in through
`train_source`: the loop calls `source.next_batch(state)` once per step with the train state about to be
updated, and the source (tasks/rollout_buffer.py) makes a rollout from state's params when its buffer is spent:
answers by inference/generate.Generator, whose jitted steps take the params as an argument, so every rollout
reuses one compilation; scores and log-probabilities by models it loads once (tasks/rollout.py). The train step
stays (state, batch) -> (state, metrics); several epochs over a rollout are several steps. What a rollout
measured reaches TensorBoard through `source.scalars()`, its time is left out of the step time, the buffer and
position are the source's saved state, and `evaluate` answers held-out prompts instead of scoring eval batches.
A task that trains more than one model (PPO: policy and value) returns them as one tree from
`trained_model(cfg)`; `exported_params` picks what its exports hold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

import jax

from llm_jax.config import Config
from llm_jax.data import pipeline
from llm_jax.data.chat.prepared import check_template
from llm_jax.data.tokenizer import check_fits
from llm_jax.errors import ConfigError
from llm_jax.model import Transformer, flops


class BatchSource(Protocol):
    """Where a task's training batches come from (data/pipeline.DatasetSource for fixed data sets)."""

    def next_batch(self, state) -> Any:
        """This process's rows of the next global batch, (M, B/M, ...) per entry, for the step about to
        update `state`."""

    def get_state(self) -> bytes:
        """The position to resume from, saved with every checkpoint."""

    def set_state(self, state: bytes) -> None: ...

    def start_prefetch(self) -> None: ...

    def scalars(self) -> dict[str, float]:
        """What producing the batches since the last call measured, logged at the step they feed ({} for data
        sets; a rollout's rewards and timing for RL). "perf/rollout_s" is left out of the step time."""

    def restart_at(self, step: int) -> None:
        """Continue at global batch `step` (a resume onto another number of processes)."""

    def close(self) -> None: ...


@dataclass
class Summary:
    """What a task adds at the end of a run: entries of results.json, scalars and lines for the console."""
    results: dict
    scalars: dict[str, float]
    text: str


@dataclass
class Evaluation:
    """One evaluation of the held-out split: the objective's sums and its eval/ scalars; for the last step,
    also the task's Summary (on process 0)."""
    step: int
    sums: dict[str, float]
    n_batches: int
    scores: dict[str, float]
    summary: Summary | None = None


class Task:
    name: ClassVar[str]
    head: ClassVar[str] = "lm"
    batch_type: ClassVar[type]
    loss: ClassVar[str]
    count: ClassVar[str]
    progress: ClassVar[tuple[str, str]]  # (label, scalar) on the progress bar
    # (scalar, column label) that sum a run up in reports and TensorBoard's HParams: train ones first, the last
    # one the headline that the report's plots show.
    summary_scalars: ClassVar[tuple[tuple[str, str], ...]]
    counts: ClassVar[tuple[str, ...]]  # sums that count what an evaluation scored, reported in results.json
    sequences_per_example: ClassVar[int] = 1  # rows of seq_len tokens in one example of the batch
    throughput: ClassVar[str] = "perf/tokens_per_sec"  # the scalar of the train step's tokens per second
    source_kinds: ClassVar[tuple[str, ...]]  # the `kind:` prefixes data.sources may use
    prepared_type: ClassVar[type]  # what prepare writes and load reads (data/shards.PreparedDir subclasses)
    renders_dialogues: ClassVar[bool] = False  # its data went through data.chat_template (checked at load)
    # Rendered through the chat template with the fine-tuned model's own tokenizer, which knows the chat tokens.
    needs_tokenizer: ClassVar[bool] = False

    def __init__(self, cfg: Config):
        self.cfg = cfg

    @classmethod
    def trained_model(cls, cfg: Config):
        """The model whose params a run trains (and checkpoints), with the run's adapters (peft.*)."""
        return Transformer(cfg.model, head=cls.head, peft=cfg.peft)

    @staticmethod
    def exported_params(params):
        """What an export of the trained params holds: a Transformer with the task's head."""
        return params

    def check(self) -> None:
        """Checks what this task needs of the config, before any data is read."""
        for source in self.cfg.data.sources:
            kind = source.partition(":")[0]
            if kind not in self.source_kinds:
                raise ConfigError(f"data.sources entry {source!r}: task={self.name} reads "
                                  f"{', '.join(self.source_kinds)} sources, not {kind!r}")
        if self.cfg.peft.method != "none" and not self.cfg.checkpoint.init_from:
            raise ConfigError(f"peft.method={self.cfg.peft.method} fine-tunes an export: set checkpoint.init_from="
                              "EXPORT (the frozen base model)")
        if self.needs_tokenizer and not self.cfg.data.tokenizer:
            raise ConfigError(f"task={self.name} needs the pretrained model's tokenizer (with its chat tokens): "
                              "set checkpoint.init_from=EXPORT or data.tokenizer=PATH")

    # --- data -----------------------------------------------------------------------------------------------
    def prepare(self, out_dir: Path) -> None:
        """Writes this config's data into out_dir, unless it holds them already; load(out_dir) reads them."""
        raise NotImplementedError

    def load(self, path: Path):
        """The prepared data in path, its tokenizer checked to fit the model."""
        data = self.prepared_type.load(path)
        check_fits(data.tokenizer, self.cfg.model.vocab_size, str(data.tokenizer_path))
        if self.renders_dialogues:
            check_template(data.meta, self.cfg, path)
        return data

    def rows(self, data, split: str):
        """The random-access rows (instances of batch_type) of a split of the loaded data."""
        return data.rows(split, self.cfg.data.seq_len)

    def train_source(self, data, process_index: int, process_count: int) -> BatchSource:
        """Shuffled batches of the train rows (a task whose batches come from the model overrides this)."""
        c = self.cfg
        return pipeline.DatasetSource(self.rows(data, "train"), c.train.batch_size, c.train.microbatches,
                                      c.train.seed, process_index, process_count, c.data.num_workers)

    def eval_batches(self, data, process_index: int, process_count: int, max_batches: int) -> list:
        """The eval rows in order, this process's share, the last batch padded with rows that count nothing."""
        padding = self.batch_type.padding(self.cfg.data.seq_len, data.tokenizer.pad_id)
        return pipeline.ordered_batches(self.rows(data, "eval"), self.cfg.train.batch_size, process_index,
                                        process_count, max_batches, padding)

    def evaluate(self, data, params, eval_step, max_batches: int) -> tuple[dict, int]:
        """The objective's sums over the held-out split, summed on the host in float64 (float32 totals stop
        counting bytes exactly past 2**24), and the number of batches scored. eval_step(params, local batch)
        -> sums runs the jitted eval step on the mesh."""
        batches = self.eval_batches(data, jax.process_index(), jax.process_count(), max_batches)
        per_batch = jax.device_get([eval_step(params, local) for local in batches])
        return {k: math.fsum(float(sums[k]) for sums in per_batch) for k in per_batch[0]}, len(batches)

    # --- objective ------------------------------------------------------------------------------------------
    def sums(self, model, params, batch, frozen: dict) -> dict:
        """The objective's sums over a batch; `frozen` holds the params of frozen_exports, by name."""
        raise NotImplementedError

    def initial_params(self, target_params) -> tuple[dict, list[str]]:
        """The params a fresh run starts from, given checkpoint.init_from, laid out like target_params, and the
        names of those initialised fresh (a head the export lacks)."""
        from llm_jax.train.export import load_params
        return load_params(Path(self.cfg.checkpoint.init_from), self.cfg, target_params)

    def frozen_exports(self) -> dict[str, tuple[str, Path]]:
        """Exports whose params the objective reads but never trains (DPO's reference): name -> (the config key
        that names the export, its path). Loaded once, laid out like the trained params, passed to sums as
        `frozen`, never checkpointed."""
        return {}

    def scalars(self, sums: dict, prefix: str) -> dict:
        raise NotImplementedError

    # --- reporting ------------------------------------------------------------------------------------------
    @property
    def tokens_per_step(self) -> int:
        return self.cfg.train.batch_size * self.sequences_per_example * self.cfg.data.seq_len

    @property
    def flops_per_token(self) -> float:
        return flops.flops_per_token(self.cfg.model, self.cfg.data.seq_len, unembed=self.head == "lm",
                                     frozen=self.cfg.peft.method != "none")

    def step_shape(self) -> str:
        return f"{self.cfg.train.batch_size}×{self.cfg.data.seq_len} tokens/step"

    def describe(self, data) -> str:
        raise NotImplementedError

    def reference_lines(self, data) -> dict[str, dict[str, float]]:
        """Fixed values to draw beside the run's own curves, by name (each a sibling TensorBoard run): what the
        held-out split costs a compressor, say {"xz": {"eval/bits_per_byte": 1.71}, ...}. Process 0, once."""
        return {}

    def finish(self, data, evaluation: Evaluation) -> Summary:
        return Summary({}, {}, "")
