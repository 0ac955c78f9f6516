"""THE path by which a trained model runs outside training: generate, chat, score, eval and compress all
go through a ModelRunner.

It keeps the params where they are laid out (load() restores a checkpoint or export straight onto a mesh:
the training mesh if these devices fit it, else FSDP over all of them), jits functions on that mesh with
the logical sharding rules in force (batch over data and fsdp, heads over tensor), rounds batches up to
whole rows per device, and makes empty KV caches for decoding. Params that are not on a mesh (a test's
plain init) run under plain jax.jit on their device.
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from llm_jax.config import Config, ModelConfig, PeftConfig
from llm_jax.errors import ConfigError
from llm_jax.model import Transformer
from llm_jax.parallel import sharding


HEAD_NAMES = {"lm": "language model", "reward": "reward model"}


def default_context(cfg: Config) -> int:
    """The context a model was trained for: its training sequence length, capped by a learned position table."""
    m = cfg.model
    return min(cfg.data.seq_len, m.max_seq_len) if m.position == "learned" else cfg.data.seq_len


class ModelRunner:
    def __init__(self, model_cfg: ModelConfig, params, head: str = "lm", peft: PeftConfig = PeftConfig()):
        self.cfg, self.params, self.head, self.peft = model_cfg, params, head, peft
        placement = jax.tree.leaves(params)[0].sharding
        self.mesh = placement.mesh if isinstance(placement, jax.sharding.NamedSharding) else None
        self._cache_shapes = {}  # (batch, length) -> the cache's shapes: tracing init per window is not free

    @classmethod
    def load(cls, path: Path, step: int | None = None, head: str | None = "lm") -> tuple[Config, "ModelRunner", object]:
        """(config, runner, tokenizer) of a run directory (its latest checkpoint, or `step`) or an export,
        whose model must end in `head` (what the command using it needs; None: either)."""
        from llm_jax import tasks  # tasks/ runs models through this module: read it when loading, not importing
        from llm_jax.train.export import load_for_inference
        cfg, params, tokenizer = load_for_inference(Path(path), step)
        runner = cls(cfg.model, params, tasks.TASKS[cfg.task].head, tasks.exported_peft(cfg))
        if head is not None and runner.head != head:
            raise ConfigError(f"{path} is a {HEAD_NAMES[runner.head]} (task={cfg.task}), not the "
                              f"{HEAD_NAMES[head]} this command needs")
        return cfg, runner, tokenizer

    def model(self, decode: bool = False) -> Transformer:
        return Transformer(self.cfg, head=self.head, decode=decode, peft=self.peft)

    def jit(self, fn, **jit_kwargs):
        """jax.jit of fn, on the params' mesh when there is one."""
        if self.mesh is None:
            return jax.jit(fn, **jit_kwargs)
        return sharding.jit_on_mesh(fn, self.mesh, **jit_kwargs)

    def jit_batch(self, fn, batch_axes):
        """jax.jit of fn(params, batch) -> replicated results, the batch split by its logical axes (a pytree
        of axis-name tuples shaped like the batch) over the mesh."""
        if self.mesh is None:
            return jax.jit(fn)
        return sharding.jit_on_mesh(fn, self.mesh, in_shardings=(jax.tree.map(lambda x: x.sharding, self.params),
                                                                 sharding.batch_shardings(self.mesh, batch_axes)),
                                    out_shardings=sharding.replicated(self.mesh))

    @functools.cached_property
    def summed_nats(self):
        """Jitted (params, TokenBatch) -> float32[rows]: each row's nats summed over its weighted targets,
        through tasks.losses.next_token_nats (so model.logits_chunk applies); made once per runner, so that
        every caller (compare's KL, in-context benchmarks) reuses its compilations."""
        from llm_jax.data.batches import TokenBatch
        from llm_jax.tasks.losses import next_token_nats
        model = self.model()
        return self.jit_batch(lambda p, b: jnp.sum(next_token_nats(model, p, b) * b.weights, axis=-1),
                              TokenBatch.axes())

    @functools.cached_property
    def greedy(self):
        """A greedy generate.Generator of this runner, made once (its prefill and step compile once)."""
        from llm_jax.inference.generate import Generator, Sampling
        return Generator(self, Sampling(temperature=0.0))

    def check_length(self, tokens: int, what: str) -> None:
        """A sequence of `tokens` (named `what` in the error) holds at least one token and, with learned
        positions, fits the position table (beyond it the model would read garbage positions)."""
        if tokens < 1:
            raise ConfigError(f"{what}={tokens}: needs at least 1 token")
        if self.cfg.position == "learned" and tokens > self.cfg.max_seq_len:
            raise ConfigError(f"{what}={tokens} exceeds model.max_seq_len={self.cfg.max_seq_len}")

    def round_rows(self, rows: int) -> int:
        """`rows` rounded up to a multiple of the devices a batch is split over."""
        split = 1 if self.mesh is None else sharding.batch_split(self.mesh)
        return -(-rows // split) * split

    def empty_cache(self, batch: int, length: int):
        """Zeroed KV caches for `batch` rows of up to `length` tokens."""
        if (batch, length) not in self._cache_shapes:
            dummy = jnp.zeros((batch, length), jnp.int32)
            self._cache_shapes[batch, length] = jax.eval_shape(
                lambda: self.model(decode=True).init(jax.random.key(0), dummy, dummy, dummy))["cache"]
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._cache_shapes[batch, length])
