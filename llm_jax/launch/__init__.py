"""Launchers: the same `llm-jax` command line here (local.py), on SLURM GPU nodes (slurm.py) or a TPU slice
(tpu.py); main.py is `python -m llm_jax.launch`."""
