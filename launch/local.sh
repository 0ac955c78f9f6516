#!/usr/bin/env bash
# One process on this machine, all its devices in one mesh: launch/local.sh --config pretrain_tiny [--set k=v ...]
# Multi-process, SLURM and TPU-pod launchers build on the same `llm-jax train` command.
set -euo pipefail
exec llm-jax train "$@"
