"""Depth at GPT-2 small width: gpt2_124m (d 768, 12 heads) at 6, 12 and 24 layers, the full 20k steps each.

For accelerators; each run is one job on a GPU node or a TPU slice, for example:

    llm-jax sweep layers_gpt2 --launcher slurm --nodes 1 --gpus-per-node 8 --dry-run   # print the sbatch scripts
    llm-jax sweep layers_gpt2 --launcher tpu --tpu-name NAME --zone ZONE               # one run after the other
    llm-jax report runs/sweeps/layers_gpt2

Every run trains on the same 5.2B tokens (20k steps × 256 × 1024), so the report compares depth at a fixed
token budget and against training FLOPs: 2.3e18, 3.8e18 and 6.7e18 (the 32k-way output layer costs the same
at every depth).
"""
from llm_jax.sweep.plan import Sweep


def sweep() -> Sweep:
    return Sweep(base="gpt2_124m", grid={"model.n_layers": (6, 12, 24)})
