"""Hugging Face checkpoints in and out: GPT-2 and Llama-family models as llm_jax export directories.

    import_hf(HF_DIR, OUT)      a local HF model directory (config.json + *.safetensors, sharded or not)
                                -> an `llm-jax export`-style directory (params/, config.json, tokenizer.model,
                                step), usable by `llm-jax sample`, `eval`, checkpoint.init_from, ...
    export_hf(EXPORT, OUT)      the reverse: an llm_jax export (or run) directory -> config.json,
                                model.safetensors and the tokenizer, loadable by transformers'
                                AutoModelForCausalLM.from_pretrained(OUT).

Supported: model_type "gpt2" (Conv1D (in, out) weights, packed c_attn, learned positions, LayerNorm with bias,
tanh GELU) and "llama" / "mistral" (RMSNorm, half-split RoPE, SwiGLU, grouped KV heads; no biases, no RoPE
scaling, silu). Refused, with one line: pickle weights (*.bin, *.pt), attention/MLP biases on Llama
(Qwen2-style q/k/v biases included), rope scaling, other activations, GPT-2's scale_attn_by_inverse_layer_idx,
and on export any model that is not a language model (a reward model's task).
A Mistral sliding window shorter than the context is not modelled: data.seq_len is capped at it.

This module maps the configs and tokenizers; the weights are read and written with safetensors' numpy API
(safetensors_io.py: neither torch nor transformers is needed) and renamed and reshaped by hf_params.py.
Parameters are float32 and compute_dtype is float32, for parity.

Tokenizers: a sentencepiece `tokenizer.model` (Llama) is copied with its dummy prefix turned off (see
lossless_sentencepiece); a byte-level BPE `tokenizer.json` (GPT-2's, also Llama-3-style ones) is copied as it is
to the export's `tokenizer.model` file name (llm_jax's Tokenizer.load recognises the JSON). export_hf writes
them back as tokenizer.model / tokenizer.json (no tokenizer_config.json: transformers' AutoTokenizer may need
one written by hand).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from llm_jax.atomic import atomic_directory
from llm_jax.config import Config, DataConfig, ModelConfig, gpt2, llama, to_json, validate
from llm_jax.data.byte_bpe import ByteLevelBPETokenizer
from llm_jax.errors import DataError, HFError
from llm_jax.interop.hf_params import hf_weights, params_from_hf
from llm_jax.interop.hf_peft import adapter_weights, fold_adapter, write_adapter
from llm_jax.interop.safetensors_io import read_weights, safetensors_numpy

LLAMA_TYPES = ("llama", "mistral")
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


# ---------------------------------------------------------------------------------------------- HF -> llm_jax

def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = params.get("rope_type", "default")
    if (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")) or rope_type != "default":
        raise HFError(f"rope scaling ({scaling or params}) is not supported; only plain RoPE")
    return float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def hf_model_config(hf: dict) -> tuple[ModelConfig, int]:
    """The llm_jax ModelConfig of an HF config.json, and the longest sequence it models faithfully."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in GPT2_ACTIVATIONS:
            raise HFError(f"GPT-2 activation_function={act!r} is not supported (llm_jax has the tanh GELU, gelu_new)")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise HFError("GPT-2 attention scaling other than 1/sqrt(head_dim) is not supported")
        d, n = hf["n_embd"], hf["n_head"]
        positions = hf.get("n_positions", 1024)
        model = gpt2(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["n_layer"], n_heads=n, n_kv_heads=n,
                     head_dim=0, d_ff=hf.get("n_inner") or 4 * d, max_seq_len=positions,
                     norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
                     tie_embeddings=bool(hf.get("tie_word_embeddings", True)))
        return model, positions
    if kind in LLAMA_TYPES:
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise HFError(f"{kind} with attention_bias/mlp_bias is not supported (llm_jax's Llama has no biases)")
        if hf.get("hidden_act", "silu") != "silu":
            raise HFError(f"{kind} hidden_act={hf.get('hidden_act')!r} is not supported (only silu / SwiGLU)")
        d, n = hf["hidden_size"], hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or d // n
        positions = hf.get("max_position_embeddings", 2048)
        model = llama(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=n,
                      n_kv_heads=hf.get("num_key_value_heads") or n, head_dim=head_dim,
                      d_ff=hf["intermediate_size"], max_seq_len=positions,
                      norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(hf),
                      tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
        if kind == "mistral" and hf.get("sliding_window"):
            positions = min(positions, hf["sliding_window"])
        return model, positions
    raise HFError(f"model_type={kind!r} is not supported (supported: gpt2, {', '.join(LLAMA_TYPES)})")


def _tokenizer_source(hf_dir: Path, kind: str, tokenizer: Path | None) -> Path:
    if tokenizer is not None:
        return Path(tokenizer)
    names = ("tokenizer.json", "tokenizer.model") if kind == "gpt2" else ("tokenizer.model", "tokenizer.json")
    for name in names:
        if (hf_dir / name).is_file():
            return hf_dir / name
    raise HFError(f"{hf_dir} has no tokenizer.model (sentencepiece) or tokenizer.json (byte-level BPE); "
                  "pass the tokenizer file explicitly")


def lossless_sentencepiece(proto: bytes) -> bytes:
    """The sentencepiece model with its dummy prefix and whitespace squeezing turned off (Llama's tokenizer.model
    adds a "▁" before each text): llm_jax counts the bytes of every token, which must add up to the text's.
    The first word of a text is then tokenized without its leading-space piece, as it would be mid-text."""
    from sentencepiece import sentencepiece_model_pb2
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(proto)
    spec = model.normalizer_spec
    if not spec.add_dummy_prefix and not spec.remove_extra_whitespaces:
        return proto
    spec.add_dummy_prefix = False
    spec.remove_extra_whitespaces = False
    return model.SerializeToString()


def import_hf(hf_dir: Path, out: Path, tokenizer: Path | None = None, scan_layers: bool = False,
              adapter: Path | None = None) -> Config:
    """Converts a local Hugging Face GPT-2 / Llama / Mistral checkpoint into an llm_jax export directory `out`,
    with a PEFT LoRA adapter directory folded in if `adapter` names one.

    The tokenizer is `tokenizer` if given, else the directory's tokenizer.json (GPT-2) or tokenizer.model
    (sentencepiece). Returns the export's Config (float32 params and compute, data.seq_len = min(2048, the
    model's context)).
    """
    from llm_jax.data.tokenizer import Tokenizer
    hf_dir, out = Path(hf_dir), Path(out)
    if out.exists():
        raise HFError(f"output directory {out} already exists")
    if not (hf_dir / "config.json").is_file():
        raise HFError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    hf = json.loads((hf_dir / "config.json").read_text())
    model, context = hf_model_config(hf)
    model = dataclasses.replace(model, compute_dtype="float32", param_dtype="float32", scan_layers=scan_layers)
    cfg = validate(Config(name=f"hf-{hf['model_type']}", model=model,
                          data=dataclasses.replace(DataConfig(), seq_len=min(2048, context))))
    tok_path = _tokenizer_source(hf_dir, hf["model_type"], tokenizer)
    try:
        tok = Tokenizer.load(tok_path)
    except DataError as e:
        raise HFError(str(e)) from None
    if tok.vocab_size > model.vocab_size:
        raise HFError(f"the tokenizer {tok_path.name} has {tok.vocab_size} tokens, more than the model's "
                      f"vocab_size={model.vocab_size}")
    weights = read_weights(hf_dir)
    if adapter is not None:
        weights = fold_adapter(weights, Path(adapter), hf["model_type"])
    params = params_from_hf(model, hf["model_type"], weights)

    import orbax.checkpoint as ocp
    with atomic_directory(out) as tmp, ocp.StandardCheckpointer() as ckpt:
        ckpt.save((tmp / "params").absolute(), params)
        (tmp / "config.json").write_text(to_json(cfg))
        data = tok.serialized()
        is_bpe = isinstance(tok, ByteLevelBPETokenizer)
        (tmp / "tokenizer.model").write_bytes(data if is_bpe else lossless_sentencepiece(data))
        (tmp / "step").write_text("0\n")
    return cfg


# ---------------------------------------------------------------------------------------------- llm_jax -> HF

def _export_adapter(run_dir: Path, out: Path, cfg: Config) -> dict:
    """A LoRA run's adapters as a PEFT adapter directory (hf_peft.py), for the base exported from init_from."""
    from llm_jax.interop.hf_params import unstacked_layers
    from llm_jax.train.export import load_adapters
    cfg, trained = load_adapters(run_dir)
    family = _family(cfg.model, cfg.task)
    layers = unstacked_layers(cfg.model, trained)
    tensors, ranks = adapter_weights(family, layers, trained.get("lm_head"), cfg.peft.rank)
    with atomic_directory(out) as tmp:
        return write_adapter(tmp, family, tensors, ranks, cfg.peft.rank, cfg.peft.alpha, cfg.checkpoint.init_from)


def _family(m: ModelConfig, task: str = "pretrain") -> str:
    """The Hugging Face architecture ("gpt2" or "llama") of the model `m` trained by `task`."""
    from llm_jax import tasks
    if task not in tasks.TASKS or tasks.TASKS[task].head != "lm":
        lm_tasks = ", ".join(name for name, t in tasks.TASKS.items() if t.head == "lm")
        raise HFError(f"task={task!r}: only language models (the lm head, tasks {lm_tasks}) have a Hugging Face "
                      "equivalent here")
    if m.qk_norm or m.logit_softcap:
        raise HFError(f"model.qk_norm={m.qk_norm}, model.logit_softcap={m.logit_softcap}: neither HF GPT-2 nor Llama "
                      "has QK-norm or logit soft-capping")
    if (m.norm, m.position, m.mlp, m.use_bias) == ("rmsnorm", "rope", "swiglu", False):
        return "llama"
    if (m.norm, m.position, m.mlp, m.use_bias) == ("layernorm", "learned", "gelu", True):
        if m.n_kv_heads != m.n_heads or m.resolved_head_dim * m.n_heads != m.d_model:
            raise HFError("GPT-2 has neither grouped KV heads nor head_dim * n_heads != d_model")
        if not m.tie_embeddings:
            raise HFError("an untied GPT-2-shaped llm_jax model has an output bias, which HF GPT-2 lacks")
        return "gpt2"
    raise HFError(f"model (norm={m.norm}, position={m.position}, mlp={m.mlp}, use_bias={m.use_bias}) is neither "
                  "llama-shaped (rmsnorm, rope, swiglu, no bias) nor gpt2-shaped (layernorm, learned, gelu, bias)")


def _hf_config(m: ModelConfig, family: str, tok) -> dict:
    bos, eos = (int(tok.bos_id) if tok.bos_id >= 0 else None), (int(tok.eos_id) if tok.eos_id >= 0 else None)
    if family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": m.vocab_size,
                "n_positions": m.max_seq_len, "n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads,
                "n_inner": m.d_ff, "activation_function": "gelu_new", "layer_norm_epsilon": m.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                "tie_word_embeddings": True, "bos_token_id": bos, "eos_token_id": eos, "dtype": "float32"}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": m.vocab_size,
            "hidden_size": m.d_model, "intermediate_size": m.d_ff, "num_hidden_layers": m.n_layers,
            "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads, "head_dim": m.resolved_head_dim,
            "hidden_act": "silu", "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
            "rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
            "rope_scaling": None, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "tie_word_embeddings": m.tie_embeddings, "bos_token_id": bos, "eos_token_id": eos,
            "pad_token_id": int(tok.pad_id) if tok.pad_id >= 0 else None, "dtype": "float32"}


def export_hf(export_dir: Path, out: Path) -> dict:
    """Writes an llm_jax export (or run) directory as a Hugging Face model directory `out`: config.json,
    model.safetensors (float32) and the tokenizer (tokenizer.model for sentencepiece, tokenizer.json for
    byte-level BPE). Returns the HF config."""
    export_dir, out = Path(export_dir), Path(out)
    if out.exists():
        raise HFError(f"output directory {out} already exists")
    if not (export_dir / "config.json").is_file() and not (export_dir / "checkpoints").is_dir():
        raise HFError(f"{export_dir} is neither an `llm-jax export` directory nor a run directory")
    save_file = safetensors_numpy().save_file
    from llm_jax.train.export import load_for_inference, saved_config
    saved = saved_config(export_dir)
    _family(saved.model, saved.task)  # refuse before reading any weights
    if saved.peft.method in ("prompt", "prefix"):
        raise HFError(f"{export_dir} has peft.method={saved.peft.method} virtual tokens, which neither HF GPT-2 nor "
                      "Llama has; only LoRA runs export (as a PEFT adapter)")
    if saved.peft.method == "lora":
        return _export_adapter(export_dir, out, saved)
    cfg, params, tok = load_for_inference(export_dir)
    family = _family(cfg.model, cfg.task)
    weights = hf_weights(cfg.model, family, params)
    hf = _hf_config(cfg.model, family, tok)
    with atomic_directory(out) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"]}, indent=2))
        name = "tokenizer.json" if isinstance(tok, ByteLevelBPETokenizer) else "tokenizer.model"
        (tmp / name).write_bytes(tok.serialized())
    return hf
