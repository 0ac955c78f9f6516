"""Weights between Hugging Face names and llm_jax's param tree, both ways, for GPT-2 and the Llama family
(Qwen2 included: Llama's weights plus q/k/v_proj biases, llm_jax's model.qkv_bias).

GPT-2's Conv1D weights are (in, out) and its q/k/v are packed into one c_attn; torch Linear weights (Llama's)
are (out, in). llm_jax keeps per-head kernels (D, N, H) and, with model.scan_layers, the layers stacked
under "layers"; the HF side always has one name per layer.
"""
from __future__ import annotations

import numpy as np

from llm_jax.config import ModelConfig
from llm_jax.errors import HFError


def params_from_hf(m: ModelConfig, kind: str, weights: dict[str, np.ndarray]) -> dict:
    """The llm_jax params (float32) of the HF `weights` of a model_type `kind` model (gpt2, else the Llama
    family, Qwen2 included) whose llm_jax config is `m`, checked leaf for leaf against the model; every weight
    must be used."""
    if kind == "gpt2":
        take = _Take(weights, ("transformer.", ""))
        params = _gpt2_params(m, take)
    else:
        take = _Take(weights, ("model.", ""))
        params = _llama_params(m, take)
    # buffers some transformers versions save beside the weights: GPT-2's causal mask, Llama's RoPE frequencies
    left = [k for k in take.w if not k.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))]
    if left:
        raise HFError(f"{len(left)} checkpoint weights have no place in the llm_jax model, e.g. {left[0]}")
    if m.scan_layers:
        params = _stack_layers(params, m.n_layers)
    _check_tree(m, params)
    return params


def hf_weights(m: ModelConfig, family: str, params: dict) -> dict[str, np.ndarray]:
    """The HF weights (contiguous float32, by HF name) of llm_jax `params` for a `family` ("gpt2", "llama" or
    "qwen2") model whose llm_jax config is `m`."""
    import jax
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    if m.scan_layers:
        params = _unstack_layers(params, m.n_layers)
    weights = _gpt2_weights(m, params) if family == "gpt2" else _llama_weights(m, params)
    return {k: np.ascontiguousarray(v, np.float32) for k, v in weights.items()}


# ---------------------------------------------------------------------------------------------- HF -> llm_jax

class _Take:
    """Pops named tensors as float32, so that leftovers (unconverted weights) can be reported."""

    def __init__(self, weights: dict[str, np.ndarray], prefix_options: tuple[str, ...]):
        self.w = dict(weights)
        self.prefixes = prefix_options

    def __call__(self, name: str) -> np.ndarray:
        for prefix in self.prefixes:
            if prefix + name in self.w:
                return np.asarray(self.w.pop(prefix + name), np.float32)
        raise HFError(f"weight {self.prefixes[0]}{name} is missing from the checkpoint")

    def maybe(self, name: str) -> np.ndarray | None:
        return self(name) if any(p + name in self.w for p in self.prefixes) else None


def _gpt2_params(m: ModelConfig, take: _Take) -> dict:
    d, n, h = m.d_model, m.n_heads, m.resolved_head_dim
    params = {"embed": {"embedding": take("wte.weight")}, "pos_embed": {"embedding": take("wpe.weight")}}
    for i in range(m.n_layers):
        p = f"h.{i}."
        qkv, qkv_b = take(p + "attn.c_attn.weight"), take(p + "attn.c_attn.bias")  # (D, 3D): Conv1D is (in, out)
        attn = {}
        for j, name in enumerate("qkv"):
            attn[name] = {"kernel": qkv[:, j * d:(j + 1) * d].reshape(d, n, h),
                          "bias": qkv_b[j * d:(j + 1) * d].reshape(n, h)}
        attn["o"] = {"kernel": take(p + "attn.c_proj.weight").reshape(n, h, d), "bias": take(p + "attn.c_proj.bias")}
        params[f"layer_{i}"] = {
            "attn_norm": {"scale": take(p + "ln_1.weight"), "bias": take(p + "ln_1.bias")},
            "attn": attn,
            "mlp_norm": {"scale": take(p + "ln_2.weight"), "bias": take(p + "ln_2.bias")},
            "mlp": {"up": {"kernel": take(p + "mlp.c_fc.weight"), "bias": take(p + "mlp.c_fc.bias")},
                    "down": {"kernel": take(p + "mlp.c_proj.weight"), "bias": take(p + "mlp.c_proj.bias")}}}
    params["final_norm"] = {"scale": take("ln_f.weight"), "bias": take("ln_f.bias")}
    head = take.maybe("lm_head.weight")
    if not m.tie_embeddings:
        head = params["embed"]["embedding"] if head is None else head
        params["lm_head"] = {"kernel": head.T.copy(), "bias": np.zeros(m.vocab_size, np.float32)}
    return params


def _llama_params(m: ModelConfig, take: _Take) -> dict:
    d, n, k, h = m.d_model, m.n_heads, m.n_kv_heads, m.resolved_head_dim
    params = {"embed": {"embedding": take("embed_tokens.weight")}}
    for i in range(m.n_layers):
        p = f"layers.{i}."
        # torch Linear weights are (out, in)
        attn = {"q": {"kernel": take(p + "self_attn.q_proj.weight").T.reshape(d, n, h)},
                "k": {"kernel": take(p + "self_attn.k_proj.weight").T.reshape(d, k, h)},
                "v": {"kernel": take(p + "self_attn.v_proj.weight").T.reshape(d, k, h)},
                "o": {"kernel": take(p + "self_attn.o_proj.weight").T.reshape(n, h, d)}}
        if m.qkv_bias:
            for name, heads in (("q", n), ("k", k), ("v", k)):
                attn[name]["bias"] = take(p + f"self_attn.{name}_proj.bias").reshape(heads, h)
        params[f"layer_{i}"] = {
            "attn_norm": {"scale": take(p + "input_layernorm.weight")},
            "attn": attn,
            "mlp_norm": {"scale": take(p + "post_attention_layernorm.weight")},
            "mlp": {"gate": {"kernel": take(p + "mlp.gate_proj.weight").T},
                    "up": {"kernel": take(p + "mlp.up_proj.weight").T},
                    "down": {"kernel": take(p + "mlp.down_proj.weight").T}}}
    params["final_norm"] = {"scale": take("norm.weight")}
    head = take.maybe("lm_head.weight")
    if not m.tie_embeddings:
        if head is None:
            raise HFError("tie_word_embeddings is false but the checkpoint has no lm_head.weight")
        params["lm_head"] = {"kernel": head.T}
    return params


def _stack_layers(params: dict, n_layers: int) -> dict:
    import jax
    layers = [params.pop(f"layer_{i}") for i in range(n_layers)]
    params["layers"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    return params


def _check_tree(cfg: ModelConfig, params: dict) -> None:
    """The converted tree must be exactly what llm_jax's Transformer creates, leaf for leaf."""
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    from llm_jax.model import Transformer
    ones = jnp.ones((1, 1), jnp.int32)
    want = nn.unbox(jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), ones, ones, ones)))["params"]
    want_flat = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(want)[0]}
    got_flat = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    if want_flat != got_flat:
        diff = sorted(set(want_flat.items()) ^ set(got_flat.items()))[:4]
        raise HFError(f"converted params do not match the llm_jax model: {diff}")


# ---------------------------------------------------------------------------------------------- llm_jax -> HF

def unstacked_layers(m: ModelConfig, params: dict) -> list[dict]:
    """Each layer's params, from a (sub)tree with the layers stacked (model.scan_layers) or not."""
    if m.scan_layers and "layers" in params:
        params = _unstack_layers({"layers": params["layers"]}, m.n_layers)
    return [params.get(f"layer_{i}", {}) for i in range(m.n_layers)]


def _unstack_layers(params: dict, n_layers: int) -> dict:
    import jax
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(n_layers):
        params[f"layer_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked)
    return params


def _gpt2_weights(m: ModelConfig, p: dict) -> dict[str, np.ndarray]:
    d = m.d_model
    w = {"transformer.wte.weight": p["embed"]["embedding"], "transformer.wpe.weight": p["pos_embed"]["embedding"],
         "transformer.ln_f.weight": p["final_norm"]["scale"], "transformer.ln_f.bias": p["final_norm"]["bias"]}
    for i in range(m.n_layers):
        layer, pre = p[f"layer_{i}"], f"transformer.h.{i}."
        a = layer["attn"]
        w[pre + "attn.c_attn.weight"] = np.concatenate([a[x]["kernel"].reshape(d, d) for x in "qkv"], axis=1)
        w[pre + "attn.c_attn.bias"] = np.concatenate([a[x]["bias"].reshape(d) for x in "qkv"])
        w[pre + "attn.c_proj.weight"] = a["o"]["kernel"].reshape(d, d)
        w[pre + "attn.c_proj.bias"] = a["o"]["bias"]
        for norm, name in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            w[pre + name + ".weight"], w[pre + name + ".bias"] = layer[norm]["scale"], layer[norm]["bias"]
        w[pre + "mlp.c_fc.weight"], w[pre + "mlp.c_fc.bias"] = layer["mlp"]["up"]["kernel"], layer["mlp"]["up"]["bias"]
        w[pre + "mlp.c_proj.weight"] = layer["mlp"]["down"]["kernel"]
        w[pre + "mlp.c_proj.bias"] = layer["mlp"]["down"]["bias"]
    return w


def _llama_weights(m: ModelConfig, p: dict) -> dict[str, np.ndarray]:
    d, nh, kh = m.d_model, m.n_heads * m.resolved_head_dim, m.n_kv_heads * m.resolved_head_dim
    w = {"model.embed_tokens.weight": p["embed"]["embedding"], "model.norm.weight": p["final_norm"]["scale"]}
    for i in range(m.n_layers):
        layer, pre = p[f"layer_{i}"], f"model.layers.{i}."
        a, mlp = layer["attn"], layer["mlp"]
        w[pre + "self_attn.q_proj.weight"] = a["q"]["kernel"].reshape(d, nh).T
        w[pre + "self_attn.k_proj.weight"] = a["k"]["kernel"].reshape(d, kh).T
        w[pre + "self_attn.v_proj.weight"] = a["v"]["kernel"].reshape(d, kh).T
        w[pre + "self_attn.o_proj.weight"] = a["o"]["kernel"].reshape(nh, d).T
        if m.qkv_bias:
            for name in "qkv":
                w[pre + f"self_attn.{name}_proj.bias"] = a[name]["bias"].reshape(-1)
        for name in ("gate", "up", "down"):
            w[pre + f"mlp.{name}_proj.weight"] = mlp[name]["kernel"].T
        w[pre + "input_layernorm.weight"] = layer["attn_norm"]["scale"]
        w[pre + "post_attention_layernorm.weight"] = layer["mlp_norm"]["scale"]
    if not m.tie_embeddings:
        w["lm_head.weight"] = p["lm_head"]["kernel"].T
    return w
