"""Typed configuration: frozen dataclasses with their defaults, the llama()/gpt2() presets, validation of
what can be checked without devices or data, and the JSON form saved with every run and checkpoint.

Experiment files, `--set` overrides and init_from are resolved into a Config by experiment.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

from llm_jax import task_config
from llm_jax.errors import ConfigError
from llm_jax.task_config import DPOConfig, EvalConfig, PeftConfig, RewardConfig, RLConfig


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 4096
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: n_heads must be a multiple of it
    head_dim: int = 0  # 0 means d_model // n_heads
    d_ff: int = 384
    max_seq_len: int = 2048  # size of the learned position table; RoPE does not need it
    norm: str = "rmsnorm"  # rmsnorm | layernorm
    norm_eps: float = 1e-5
    position: str = "rope"  # rope | learned
    rope_theta: float = 10_000.0
    mlp: str = "swiglu"  # swiglu | gelu | relu2 (ReLU squared, ungated: Primer, So et al. 2021)
    tie_embeddings: bool = False
    use_bias: bool = False
    qkv_bias: bool = False  # biases on the query, key and value projections only (Qwen2); use_bias implies them
    # RMSNorm of each head's queries and keys before RoPE (Dehghani et al. 2023; OLMo 2; modded-nanogpt): bounded
    # attention logits, so higher learning rates stay stable.
    qk_norm: bool = False
    # >0: output logits become cap * tanh(logits / cap) (Gemma 2; modded-nanogpt): no token's logit runs away.
    logit_softcap: float = 0.0
    dropout: float = 0.0  # on the embeddings and each block's two residual branches, in train steps (GPT-2's)
    init_std: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "auto"  # auto: bfloat16 on GPU/TPU, float32 on CPU
    # auto: einsum on CPU, else jax.nn.dot_product_attention's choice (cuDNN flash attention where it runs);
    # xla | cudnn: that implementation; einsum: written out; blocked: online softmax over key blocks (long on CPU)
    attention_impl: str = "auto"
    scan_layers: bool = True
    # >0: the loss computes the output layer and its log-softmax in vocabulary chunks of this size, never
    # holding (batch, length, vocab) logits in float32 (memory for big vocabularies); 0: plain logits
    logits_chunk: int = 0
    remat: str = "none"  # none | full | dots | dots_no_batch
    # The reward head's kernel init, where the task has one (0: zeros, so every pair starts at 1 bit).
    reward_init_std: float = 0.0

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads


@dataclass(frozen=True)
class MeshConfig:
    # One axis may be -1: it takes the devices the others leave.
    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclass(frozen=True)
class DataConfig:
    # Each source is "kind:pattern" (pattern relative to data_dir unless absolute); the kinds are the task's:
    # documents (data/corpus.py), dialogues (data/chat/dialogue.py) or preference pairs (data/chat/pairs.py).
    sources: tuple[str, ...] = ("python_stdlib",)
    data_dir: str = ""  # empty: $LLM_JAX_DATA, else ../shared/data beside the repository
    seq_len: int = 256
    # Fraction of the corpus bytes held out as whole documents, spread over the corpus with a fixed seed (a
    # one-document corpus: its last fraction of bytes).
    eval_fraction: float = 0.1
    max_bytes: int = 0  # cap on corpus bytes read (0: everything)
    tokenizer: str = ""  # an existing sentencepiece .model; empty: train one on the corpus
    tokenizer_type: str = "bpe"  # bpe | unigram
    tokenizer_train_bytes: int = 8_000_000  # corpus sample the tokenizer is trained on
    prepared: str = ""  # a directory from `llm-jax prepare` (any task); empty: prepare into RUN_DIR/data
    # How dialogues become tokens (data/chat/template.py): llm_jax | sep | chatml; empty: the init_from export's
    # template, else llm_jax.
    chat_template: str = ""
    num_workers: int = 0  # grain worker processes (0: in the main process)


@dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clipping (0: off)
    optimizer: str = "adamw"  # adamw | muon: Muon (Jordan et al. 2024) for the blocks' matrices, AdamW for the rest
    muon_learning_rate: float = 0.02
    muon_momentum: float = 0.95
    # cosine decay to min_lr_ratio after warmup, or wsd (warmup-stable-decay: Hu et al. 2024, Hägele et al.
    # 2024): constant, then linear to min_lr_ratio over the last decay_fraction of the steps.
    schedule: str = "cosine"  # cosine | wsd
    decay_fraction: float = 0.2


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 500
    batch_size: int = 16  # global, in sequences
    microbatches: int = 1  # gradient accumulation: batch_size is split into this many
    eval_every: int = 100
    # Global batches per evaluation (0: the whole held-out split). Every evaluation, the final one
    # included, scores the same windows, so the eval curve is one measurement over time.
    eval_batches: int = 8
    log_every: int = 10
    seed: int = 0
    peak_tflops: float = 0.0  # per-device peak for MFU; 0: look the device up in metrics.PEAK_TFLOPS
    nonfinite: str = "skip"  # a NaN/Inf loss, gradient or update: skip that update, or stop the run
    # >0: train for this many seconds instead of `steps` (evaluation and checkpoint time excluded): the step
    # count is estimated from the first measured steps, and the learning-rate schedule planned for it.
    time_budget_s: float = 0.0
    z_loss: float = 0.0  # PaLM's z-loss: + z_loss * log(Z)^2 per target in the objective (not the reported bits)
    seq_len_warmup_steps: int = 0  # >0: these first steps on windows of seq_len/4, then /2 (Li et al. 2022)


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # save every N steps (0: only at the end); always at the end and on preemption
    keep: int = 3  # the last K checkpoints are kept
    keep_period: int = 0  # also keep every M-th step for good (0: off)
    async_save: bool = True  # write in the background; the step waits only for the device-to-host copy
    # Start from the params of an `llm-jax export` directory (fresh optimizer); the model config and the
    # tokenizer then come from that export.
    init_from: str = ""


@dataclass(frozen=True)
class Config:
    name: str = "default"
    # The training algorithm (tasks/): pretrain (next-token prediction on documents), sft (on dialogues, loss
    # on the answers), reward (a pairwise reward model on preference pairs), dpo (a policy trained directly on
    # preference pairs against a frozen reference), rl (a policy trained on its own answers, scored by a reward
    # model: PPO, GRPO or RLOO).
    task: str = "pretrain"
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


CHOICES = {
    "model.norm": ("rmsnorm", "layernorm"),
    "model.position": ("rope", "learned"),
    "model.mlp": ("swiglu", "gelu", "relu2"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("auto", "float32", "bfloat16"),
    "model.attention_impl": ("auto", "xla", "cudnn", "einsum", "blocked"),
    "model.remat": ("none", "full", "dots", "dots_no_batch"),
    "data.tokenizer_type": ("bpe", "unigram"),
    "train.nonfinite": ("skip", "stop"),
    "optim.optimizer": ("adamw", "muon"),
    "optim.schedule": ("cosine", "wsd"),
    **task_config.CHOICES,
}


def llama(**overrides) -> ModelConfig:
    """Llama architecture: RMSNorm, RoPE, SwiGLU, grouped KV heads, untied output, no biases."""
    base = ModelConfig(norm="rmsnorm", position="rope", mlp="swiglu", tie_embeddings=False, use_bias=False)
    return dataclasses.replace(base, **overrides)


def gpt2(**overrides) -> ModelConfig:
    """GPT-2 architecture: LayerNorm, learned positions, GELU MLP (4x), tied embeddings, biases, MHA."""
    base = ModelConfig(norm="layernorm", position="learned", mlp="gelu", tie_embeddings=True, use_bias=True)
    merged = {"n_kv_heads": overrides.get("n_heads", base.n_heads), **overrides}
    merged.setdefault("d_ff", 4 * merged.get("d_model", base.d_model))
    return dataclasses.replace(base, **merged)


def validate(cfg: Config) -> Config:
    """Checks what can be checked without devices or data; mesh divisibility lives in parallel/sharding.py."""
    flat = to_dict(cfg)
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        if flat[section][name] not in allowed:
            raise ConfigError(f"{key}={flat[section][name]!r} is not one of {', '.join(allowed)}")
    m, t = cfg.model, cfg.train
    positive = {"model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.n_layers": m.n_layers,
                "model.n_heads": m.n_heads, "model.n_kv_heads": m.n_kv_heads, "model.d_ff": m.d_ff,
                "data.seq_len": cfg.data.seq_len, "train.steps": t.steps, "train.batch_size": t.batch_size,
                "train.microbatches": t.microbatches, "train.log_every": t.log_every}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{key}={value} must be positive")
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(f"model.n_heads={m.n_heads} must be a multiple of model.n_kv_heads={m.n_kv_heads}")
    if not m.head_dim and m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads} "
                          "(or set model.head_dim)")
    if m.position == "rope" and m.resolved_head_dim % 2:
        raise ConfigError(f"RoPE needs an even head dimension, got {m.resolved_head_dim}")
    if m.position == "learned" and cfg.data.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if m.logits_chunk < 0 or (m.logits_chunk and m.vocab_size % m.logits_chunk):
        raise ConfigError(f"model.logits_chunk={m.logits_chunk} must be 0 or divide model.vocab_size={m.vocab_size}")
    if t.batch_size % t.microbatches:
        raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by train.microbatches={t.microbatches}")
    if not 0.0 < cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction={cfg.data.eval_fraction} must lie strictly between 0 and 1")
    _check_recipe(cfg)
    c = cfg.checkpoint
    if c.every < 0 or c.keep < 1 or c.keep_period < 0:
        raise ConfigError(f"checkpoint.every={c.every}, checkpoint.keep={c.keep}, checkpoint.keep_period="
                          f"{c.keep_period}: need every >= 0, keep >= 1, keep_period >= 0")
    task_config.validate(cfg)
    if [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor].count(-1) > 1:
        raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    from llm_jax.data.chat.template import TEMPLATES  # the one list of templates; imported late (numpy, tokenizers)
    if cfg.data.chat_template not in ("", *TEMPLATES):
        raise ConfigError(f"data.chat_template={cfg.data.chat_template!r} is not one of {', '.join(TEMPLATES)}")
    return cfg


def _check_recipe(cfg: Config) -> None:
    t, o = cfg.train, cfg.optim  # the training-recipe switches: each a non-negative number, in its range
    for key in ("train.time_budget_s", "train.z_loss", "train.seq_len_warmup_steps", "model.logit_softcap",
                "optim.muon_learning_rate", "optim.muon_momentum"):
        section, name = key.split(".")
        if (value := getattr(getattr(cfg, section), name)) < 0:
            raise ConfigError(f"{key}={value} must not be negative")
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout={cfg.model.dropout} must lie in [0, 1)")
    if not 0.0 < o.decay_fraction <= 1.0:
        raise ConfigError(f"optim.decay_fraction={o.decay_fraction} must lie in (0, 1]")
    if t.seq_len_warmup_steps and cfg.data.seq_len % 4:
        raise ConfigError(f"train.seq_len_warmup_steps needs data.seq_len divisible by 4, got {cfg.data.seq_len}")


# Model fields that shape no trained weight (a new head's initialisation; dropout in train steps): a run from an
# export (another task's: a language model into a reward model) or a resumed one takes them from its own config.
RUN_FIELDS = ("reward_init_std", "dropout")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# Configs saved before `task` replaced the data section's format and the model's head (run dirs, exports) load.
_LEGACY_TASKS = {"text": "pretrain", "dialogue": "sft", "preference": "reward"}


def from_dict(d: dict) -> Config:
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    if "format" in d.get("data", {}):
        fmt = d["data"].pop("format")
        if fmt not in _LEGACY_TASKS:
            raise ConfigError(f"a saved config's data format {fmt!r} is not one of {', '.join(_LEGACY_TASKS)}")
        d.setdefault("task", _LEGACY_TASKS[fmt])
        d.get("model", {}).pop("head", None)
    sections = {f.name: f for f in dataclasses.fields(Config)}
    kwargs = {}
    for name, value in d.items():
        if name not in sections:
            raise ConfigError(f"unknown config section {name!r}")
        if isinstance(value, dict):
            typ = typing.get_type_hints(Config)[name]
            value = {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
            kwargs[name] = typ(**value)
        else:
            kwargs[name] = value
    return Config(**kwargs)


def to_json(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir(cfg: Config) -> Path:
    """Where shared data sets live: the config, then $LLM_JAX_DATA, then ../shared/data beside the repo."""
    if cfg.data.data_dir:
        return Path(cfg.data.data_dir).expanduser()
    if os.environ.get("LLM_JAX_DATA"):
        return Path(os.environ["LLM_JAX_DATA"]).expanduser()
    return REPO_ROOT.parent / "shared" / "data"
