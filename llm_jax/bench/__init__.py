"""`llm-jax bench`: the train step (train.py), the largest batch that fits (memory.py), data, decoding and
checkpoints (io.py)."""
