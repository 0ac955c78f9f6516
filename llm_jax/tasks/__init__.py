"""The training algorithms, one module each (see base.py), chosen by the config key `task`."""
from __future__ import annotations

from llm_jax.config import Config, PeftConfig
from llm_jax.errors import ConfigError
from llm_jax.model import Transformer
from llm_jax.tasks.base import Task
from llm_jax.tasks.dpo import DPO
from llm_jax.tasks.pretrain import Pretrain
from llm_jax.tasks.reward import RewardModel
from llm_jax.tasks.rl import RL
from llm_jax.tasks.sft import SFT

TASKS: dict[str, type[Task]] = {task.name: task for task in (Pretrain, SFT, RewardModel, DPO, RL)}


def make(cfg: Config, check: bool = True) -> Task:
    """The task of a validated config, checked against what it needs before any data is read (check=False:
    the config of a finished run, whose data may be gone)."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task={cfg.task!r} is not one of {', '.join(TASKS)}")
    task = TASKS[cfg.task](cfg)
    if check:
        task.check()
    return task


def model_of(cfg: Config):
    """The model a run's config trains: its decoder with the head its task needs (PPO: the policy and its
    value model)."""
    return TASKS[cfg.task].trained_model(cfg)


def exported_peft(cfg: Config) -> PeftConfig:
    """The adapters that a run's exports keep as such: prompt and prefix tuning's virtual tokens (LoRA's updates
    are folded into the kernels; train/export.py)."""
    return cfg.peft if cfg.peft.method in ("prompt", "prefix") else PeftConfig()


def exported_model(cfg: Config) -> Transformer:
    """The model that a run's exports hold and inference runs: the decoder with the task's head."""
    return Transformer(cfg.model, head=TASKS[cfg.task].head, peft=exported_peft(cfg))


def exported_params(cfg: Config, params):
    """The params of exported_model(cfg) in the params a run of cfg trains (PPO's policy without its value
    model)."""
    return TASKS[cfg.task].exported_params(params)
