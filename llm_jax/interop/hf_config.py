"""Hugging Face config.json <-> llm_jax ModelConfig, for GPT-2, the Llama family (llama, mistral) and Qwen2.

Qwen2 (Qwen2 / Qwen2.5) is Llama with biases on the q, k and v projections (model.qkv_bias) and no others;
Llama's own attention_bias also biases o_proj and is refused. A sliding attention window (Mistral's
sliding_window; Qwen2's, only with use_sliding_window and on the layers from max_window_layers on) is not
modelled: up to the window it is full causal attention, so the context is capped at it instead.
"""
from __future__ import annotations

from llm_jax.config import ModelConfig, gpt2, llama
from llm_jax.errors import HFError

LLAMA_TYPES = ("llama", "mistral", "qwen2")
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


# ---------------------------------------------------------------------------------------------- HF -> llm_jax

def hf_model_config(hf: dict) -> tuple[ModelConfig, int]:
    """The llm_jax ModelConfig of an HF config.json, and the longest sequence it models faithfully."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        return _gpt2_model(hf)
    if kind in LLAMA_TYPES:
        return _llama_model(hf, kind)
    raise HFError(f"model_type={kind!r} is not supported (supported: gpt2, {', '.join(LLAMA_TYPES)})")


def _gpt2_model(hf: dict) -> tuple[ModelConfig, int]:
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


def _llama_model(hf: dict, kind: str) -> tuple[ModelConfig, int]:
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise HFError(f"{kind} with attention_bias/mlp_bias is not supported (llm_jax has no o_proj or MLP biases; "
                      "q/k/v biases alone are model_type qwen2)")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFError(f"{kind} hidden_act={hf.get('hidden_act')!r} is not supported (only silu / SwiGLU)")
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    positions = hf.get("max_position_embeddings", 2048)
    model = llama(vocab_size=hf["vocab_size"], d_model=d, n_layers=hf["num_hidden_layers"], n_heads=n,
                  n_kv_heads=hf.get("num_key_value_heads") or n, head_dim=hf.get("head_dim") or d // n,
                  d_ff=hf["intermediate_size"], max_seq_len=positions, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                  rope_theta=_rope_theta(hf), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                  qkv_bias=kind == "qwen2")
    window = _sliding_window(hf, kind)
    return model, min(positions, window) if window else positions


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = params.get("rope_type", "default")
    if (scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default")) or rope_type != "default":
        raise HFError(f"rope scaling ({scaling or params}) is not supported; only plain RoPE")
    return float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))


def _sliding_window(hf: dict, kind: str) -> int | None:
    """The attention window of the model's sliding-window layers; None when every layer sees the whole context."""
    if kind == "mistral":
        return hf.get("sliding_window")
    if kind != "qwen2" or not hf.get("use_sliding_window") or not hf.get("sliding_window"):
        return None
    # as transformers' Qwen2Config: the layers from max_window_layers on slide, unless layer_types says otherwise
    n = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types") or ["sliding_attention" if i >= hf.get("max_window_layers", 28)
                                            else "full_attention" for i in range(n)]
    return hf["sliding_window"] if "sliding_attention" in layer_types else None


# ---------------------------------------------------------------------------------------------- llm_jax -> HF

def hf_config_json(m: ModelConfig, family: str, tok) -> dict:
    """The config.json of the `family` ("gpt2", "llama" or "qwen2") model `m` with the tokenizer `tok`."""
    bos, eos = (int(tok.bos_id) if tok.bos_id >= 0 else None), (int(tok.eos_id) if tok.eos_id >= 0 else None)
    if family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": m.vocab_size,
                "n_positions": m.max_seq_len, "n_embd": m.d_model, "n_layer": m.n_layers, "n_head": m.n_heads,
                "n_inner": m.d_ff, "activation_function": "gelu_new", "layer_norm_epsilon": m.norm_eps,
                # model.dropout is GPT-2's residual and embedding dropout (Llama's config has no place for it)
                "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": 0.0, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                "tie_word_embeddings": True, "bos_token_id": bos, "eos_token_id": eos, "dtype": "float32"}
    common = {"vocab_size": m.vocab_size, "hidden_size": m.d_model, "intermediate_size": m.d_ff,
              "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.n_kv_heads,
              "head_dim": m.resolved_head_dim, "hidden_act": "silu", "max_position_embeddings": m.max_seq_len,
              "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
              "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta}, "rope_scaling": None,
              "attention_dropout": 0.0, "tie_word_embeddings": m.tie_embeddings, "bos_token_id": bos,
              "eos_token_id": eos, "pad_token_id": int(tok.pad_id) if tok.pad_id >= 0 else None, "dtype": "float32"}
    if family == "qwen2":
        return {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **common, "use_sliding_window": False,
                "sliding_window": None, "max_window_layers": m.n_layers}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common, "attention_bias": False,
            "mlp_bias": False}
