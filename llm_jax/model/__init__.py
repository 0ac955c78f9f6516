"""The decoder-only language model (functional Flax Linen: pure `init`/`apply` over param pytrees)."""
from llm_jax.model.transformer import Transformer

__all__ = ["Transformer"]
