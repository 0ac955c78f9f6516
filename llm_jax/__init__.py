"""llm_jax: decoder-only language models in JAX, reported as compression."""
