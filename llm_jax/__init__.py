"""llm_jax: decoder-only language models in JAX, reported as compression."""
from llm_jax import malloc as _malloc

# Before any JAX computation starts XLA's threads (see malloc.py): XLA:CPU's train step is ~40% faster.
_malloc.reuse_freed_memory()
