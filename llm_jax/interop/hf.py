"""Hugging Face checkpoints in and out: GPT-2, Llama-family and Qwen2 models as llm_jax export directories.

    import_hf(HF_DIR, OUT)      a local HF model directory (config.json and its weights: *.safetensors, else
                                pytorch_model.bin, sharded or not) -> an `llm-jax export`-style directory
                                (params/, config.json, tokenizer.model, step), usable by `llm-jax sample`,
                                `eval`, checkpoint.init_from, ...
    export_hf(EXPORT, OUT)      the reverse: an llm_jax export (or run) directory -> config.json,
                                model.safetensors and the tokenizer, loadable by transformers'
                                AutoModelForCausalLM.from_pretrained(OUT).

Supported (hf_config.py): model_type "gpt2" (Conv1D (in, out) weights, packed c_attn, learned positions,
LayerNorm with bias, tanh GELU), "llama" / "mistral" (RMSNorm, half-split RoPE, SwiGLU, grouped KV heads; no
biases, no RoPE scaling, silu) and "qwen2" (Qwen2 / Qwen2.5: Llama with q/k/v biases, model.qkv_bias).
Refused, with one line: pickles that need more than PyTorch's weights-only unpickler (safetensors_io.py),
attention/MLP biases on Llama, rope scaling, other activations, GPT-2's scale_attn_by_inverse_layer_idx, and
on export any model that is not a language model (a reward model's task). A sliding attention window shorter
than the context (Mistral's; Qwen2's when use_sliding_window is on) is not modelled: data.seq_len is capped at
it.

This module maps the tokenizers and directories; the configs are mapped by hf_config.py, the weights read
(safetensors with numpy alone, pickles with torch) and written by safetensors_io.py and renamed and reshaped
by hf_params.py. Parameters are float32 and compute_dtype is float32, for parity.

Tokenizers: a sentencepiece `tokenizer.model` (Llama) is copied with its dummy prefix turned off (see
lossless_sentencepiece); a byte-level BPE `tokenizer.json` (GPT-2's, Qwen2's, also Llama-3-style ones) is
copied as it is to the export's `tokenizer.model` file name (llm_jax's Tokenizer.load recognises the JSON); a
BERT WordPiece `vocab.txt` + `tokenizer_config.json` (the Chinese GPT-2s) becomes its `tokenizers` JSON there.
export_hf writes them back as tokenizer.model / tokenizer.json / vocab.txt + tokenizer_config.json (for the
others transformers' AutoTokenizer may need a tokenizer_config.json written by hand). The chat template travels
as data.chat_template in the export's config and as generation_config.json's eos_token_id (its stop tokens).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from llm_jax.atomic import atomic_directory
from llm_jax.config import Config, DataConfig, ModelConfig, to_json, validate
from llm_jax.data.byte_bpe import ByteLevelBPETokenizer
from llm_jax.data.wordpiece import WordPieceTokenizer
from llm_jax.errors import ConfigError, DataError, HFError
from llm_jax.interop.hf_config import hf_config_json, hf_model_config
from llm_jax.interop.hf_params import hf_weights, params_from_hf
from llm_jax.interop.hf_peft import adapter_weights, fold_adapter, write_adapter
from llm_jax.interop.safetensors_io import read_weights, safetensors_numpy

# ---------------------------------------------------------------------------------------------- HF -> llm_jax

def _tokenizer_source(hf_dir: Path, hf: dict, tokenizer: Path | None) -> Path:
    if tokenizer is not None:
        return Path(tokenizer)
    names = ("tokenizer.json", "tokenizer.model", "vocab.txt")
    if hf["model_type"] in ("llama", "mistral"):  # GPT-2, Qwen2 ship byte-level BPE; Llama 1/2, Mistral sentencepiece
        names = ("tokenizer.model", "tokenizer.json", "vocab.txt")
    if str(hf.get("tokenizer_class", "")).startswith("Bert"):  # the Chinese GPT-2s: a BERT WordPiece vocab.txt
        names = ("vocab.txt",)
    for name in names:
        if (hf_dir / name).is_file():
            return hf_dir / name
    raise HFError(f"{hf_dir} has no {' or '.join(names)}; pass the tokenizer file with --tokenizer")


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
              adapter: Path | None = None, chat_template: str = "") -> Config:
    """Converts a local Hugging Face GPT-2 / Llama / Mistral / Qwen2 checkpoint into an llm_jax export directory
    `out`, with a PEFT LoRA adapter directory folded in if `adapter` names one.

    The tokenizer is `tokenizer` if given, else the directory's tokenizer.json (GPT-2, Qwen2), tokenizer.model
    (sentencepiece: Llama, Mistral) or vocab.txt (BERT WordPiece, with its tokenizer_config.json: a config with
    tokenizer_class BertTokenizer). The export records `chat_template`, by default the one the tokenizer's
    special tokens are for (sep for [CLS]/[SEP], chatml for <|im_start|>/<|im_end|>, else llm_jax's). Returns the
    export's Config (float32 params and compute, data.seq_len = min(2048, the model's context)).
    """
    from llm_jax.data.chat import template
    from llm_jax.data.tokenizer import Tokenizer
    hf_dir, out = Path(hf_dir), Path(out)
    if out.exists():
        raise HFError(f"output directory {out} already exists")
    if not (hf_dir / "config.json").is_file():
        raise HFError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    hf = json.loads((hf_dir / "config.json").read_text())
    model, context = hf_model_config(hf)
    model = dataclasses.replace(model, compute_dtype="float32", param_dtype="float32", scan_layers=scan_layers)
    tok_path = _tokenizer_source(hf_dir, hf, tokenizer)
    try:
        tok = Tokenizer.load(tok_path)
    except DataError as e:
        raise HFError(str(e)) from None
    chat_template = chat_template or template.suggested(tok)
    try:
        template.tags(tok, chat_template)  # a template this tokenizer cannot render is refused here, not at SFT
    except ConfigError as e:
        raise HFError(f"--chat-template: {e}") from None
    cfg = validate(Config(name=f"hf-{hf['model_type']}", model=model,
                          data=DataConfig(seq_len=min(2048, context), chat_template=chat_template)))
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
        data = tok.serialized()  # a tokenizer.json is kept as it is, under the name every export uses
        (tmp / "tokenizer.model").write_bytes(lossless_sentencepiece(data) if isinstance(tok, Tokenizer) else data)
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
    """The Hugging Face architecture ("gpt2", "llama" or "qwen2") of the model `m` trained by `task`."""
    from llm_jax import tasks
    if task not in tasks.TASKS or tasks.TASKS[task].head != "lm":
        lm_tasks = ", ".join(name for name, t in tasks.TASKS.items() if t.head == "lm")
        raise HFError(f"task={task!r}: only language models (the lm head, tasks {lm_tasks}) have a Hugging Face "
                      "equivalent here")
    if m.qk_norm or m.logit_softcap:
        raise HFError(f"model.qk_norm={m.qk_norm}, model.logit_softcap={m.logit_softcap}: none of HF GPT-2, Llama "
                      "and Qwen2 has QK-norm or logit soft-capping")
    if (m.norm, m.position, m.mlp, m.use_bias) == ("rmsnorm", "rope", "swiglu", False):
        return "qwen2" if m.qkv_bias else "llama"
    if (m.norm, m.position, m.mlp, m.use_bias) == ("layernorm", "learned", "gelu", True):
        if m.n_kv_heads != m.n_heads or m.resolved_head_dim * m.n_heads != m.d_model:
            raise HFError("GPT-2 has neither grouped KV heads nor head_dim * n_heads != d_model")
        if not m.tie_embeddings:
            raise HFError("an untied GPT-2-shaped llm_jax model has an output bias, which HF GPT-2 lacks")
        return "gpt2"
    raise HFError(f"model (norm={m.norm}, position={m.position}, mlp={m.mlp}, use_bias={m.use_bias}) is neither "
                  "llama-shaped (rmsnorm, rope, swiglu, no bias; with model.qkv_bias: qwen2) nor gpt2-shaped "
                  "(layernorm, learned, gelu, bias)")


def export_hf(export_dir: Path, out: Path) -> dict:
    """Writes an llm_jax export (or run) directory as a Hugging Face model directory `out`: config.json,
    generation_config.json, model.safetensors (float32) and the tokenizer (tokenizer.model for sentencepiece,
    tokenizer.json for byte-level BPE, vocab.txt and tokenizer_config.json for WordPiece). Returns the HF
    config."""
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
        raise HFError(f"{export_dir} has peft.method={saved.peft.method} virtual tokens, which none of HF GPT-2, "
                      "Llama and Qwen2 has; only LoRA runs export (as a PEFT adapter)")
    if saved.peft.method == "lora":
        return _export_adapter(export_dir, out, saved)
    cfg, params, tok = load_for_inference(export_dir)
    family = _family(cfg.model, cfg.task)
    weights = hf_weights(cfg.model, family, params)
    hf = hf_config_json(cfg.model, family, tok)
    if isinstance(tok, WordPieceTokenizer):
        hf["tokenizer_class"] = "BertTokenizer"  # what AutoTokenizer reads vocab.txt with
    with atomic_directory(out) as tmp:
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": hf["bos_token_id"], "eos_token_id": _stops(tok, cfg.data.chat_template)}, indent=2))
        for name, data in _tokenizer_files(tok).items():
            (tmp / name).write_bytes(data)
    return hf


def _stops(tok, chat_template: str) -> int | list[int]:
    """generation_config's eos_token_id: what ends an answer in the export's chat template (EOS and, for chatml,
    <|im_end|>), so that transformers' generate stops where llm_jax's does."""
    from llm_jax.data.chat.template import stop_ids
    stops = sorted(stop_ids(tok, chat_template))
    return stops[0] if len(stops) == 1 else stops


def _tokenizer_files(tok) -> dict[str, bytes]:
    if isinstance(tok, WordPieceTokenizer):
        return tok.hf_files()
    return {"tokenizer.json" if isinstance(tok, ByteLevelBPETokenizer) else "tokenizer.model": tok.serialized()}
