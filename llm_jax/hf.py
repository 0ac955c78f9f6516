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
(Qwen2-style q/k/v biases included), rope scaling, other activations, GPT-2's scale_attn_by_inverse_layer_idx.
A Mistral sliding window shorter than the context is not modelled: data.seq_len is capped at it.

Weights are read and written with safetensors' numpy API (bfloat16 tensors are widened to float32 by hand);
neither torch nor transformers is needed. Parameters are float32 and compute_dtype is float32, for parity.

Tokenizers: a sentencepiece `tokenizer.model` (Llama) is copied with its dummy prefix turned off (see
lossless_sentencepiece); a byte-level BPE `tokenizer.json` (GPT-2's, also Llama-3-style ones) is copied as it is
to the export's `tokenizer.model` file name (llm_jax's Tokenizer.load recognises the JSON). export_hf writes
them back as tokenizer.model / tokenizer.json (no tokenizer_config.json: transformers' AutoTokenizer may need
one written by hand).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import numpy as np

from llm_jax.config import Config, DataConfig, ModelConfig, gpt2, llama, to_json, validate

LLAMA_TYPES = ("llama", "mistral")
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


class HFError(ValueError):
    """A Hugging Face directory or llm_jax model that cannot be converted; the message is one line."""


# ---------------------------------------------------------------------------------------------- safetensors

def _safetensors_numpy():
    try:
        import safetensors.numpy
    except ImportError:
        raise HFError("Hugging Face conversion needs the `safetensors` package: pip install -e '.[hf]'") from None
    return safetensors.numpy


def _weight_files(hf_dir: Path) -> list[Path]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [hf_dir / n for n in names]
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise HFError(f"{hf_dir} has only pickle weights ({', '.join(pickles[:3])}), which are refused (loading "
                      "them can run code); convert them to .safetensors first")
    raise HFError(f"{hf_dir}: no *.safetensors weights")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    if not any(v.get("dtype") == "BF16" for k, v in header.items() if k != "__metadata__"):
        return _safetensors_numpy().load_file(str(path))
    # numpy has no bfloat16: read the raw buffer and widen bf16 to float32 by hand.
    raw = np.memmap(path, np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = raw[start:end]
        if info["dtype"] == "BF16":
            arr = (buf.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            dtypes = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
                      "U8": np.uint8, "BOOL": np.bool_}
            if info["dtype"] not in dtypes:
                raise HFError(f"{path.name}: tensor {name} has unsupported dtype {info['dtype']}")
            arr = np.array(buf.view(dtypes[info["dtype"]]))
        out[name] = arr.reshape(info["shape"])
    return out


def _read_weights(hf_dir: Path) -> dict[str, np.ndarray]:
    weights = {}
    for path in _weight_files(hf_dir):
        weights.update(_read_safetensors(path))
    return weights


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


def _unstack_layers(params: dict, n_layers: int) -> dict:
    import jax
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(n_layers):
        params[f"layer_{i}"] = jax.tree.map(lambda x, i=i: np.asarray(x[i]), stacked)
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


def import_hf(hf_dir: Path, out: Path, tokenizer: Path | None = None, scan_layers: bool = False) -> Config:
    """Converts a local Hugging Face GPT-2 / Llama / Mistral checkpoint into an llm_jax export directory `out`.

    The tokenizer is `tokenizer` if given, else the directory's tokenizer.json (GPT-2) or tokenizer.model
    (sentencepiece). Returns the export's Config (float32 params and compute, data.seq_len = min(2048, the
    model's context)).
    """
    from llm_jax.data.corpus import DataError
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
    weights = _read_weights(hf_dir)
    if hf["model_type"] == "gpt2":
        take = _Take(weights, ("transformer.", ""))
        params = _gpt2_params(model, take)
    else:
        take = _Take(weights, ("model.", ""))
        params = _llama_params(model, take)
    left = [k for k in take.w if not k.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq"))]
    if left:
        raise HFError(f"{len(left)} checkpoint weights have no place in the llm_jax model, e.g. {left[0]}")
    if scan_layers:
        params = _stack_layers(params, model.n_layers)
    _check_tree(model, params)

    import orbax.checkpoint as ocp
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save((tmp / "params").absolute(), params)
    (tmp / "config.json").write_text(to_json(cfg))
    data = tok.serialized()
    (tmp / "tokenizer.model").write_bytes(data if data.lstrip()[:1] == b"{" else lossless_sentencepiece(data))
    (tmp / "step").write_text("0\n")
    tmp.rename(out)
    return cfg


# ---------------------------------------------------------------------------------------------- llm_jax -> HF

def _family(m: ModelConfig) -> str:
    if m.head != "lm":
        raise HFError(f"model.head={m.head!r}: only language models (head=lm) have a Hugging Face equivalent here")
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
        for name in ("gate", "up", "down"):
            w[pre + f"mlp.{name}_proj.weight"] = mlp[name]["kernel"].T
        w[pre + "input_layernorm.weight"] = layer["attn_norm"]["scale"]
        w[pre + "post_attention_layernorm.weight"] = layer["mlp_norm"]["scale"]
    if not m.tie_embeddings:
        w["lm_head.weight"] = p["lm_head"]["kernel"].T
    return w


def export_hf(export_dir: Path, out: Path) -> dict:
    """Writes an llm_jax export (or run) directory as a Hugging Face model directory `out`: config.json,
    model.safetensors (float32) and the tokenizer (tokenizer.model for sentencepiece, tokenizer.json for
    byte-level BPE). Returns the HF config."""
    export_dir, out = Path(export_dir), Path(out)
    if out.exists():
        raise HFError(f"output directory {out} already exists")
    if not (export_dir / "config.json").is_file() and not (export_dir / "checkpoints").is_dir():
        raise HFError(f"{export_dir} is neither an `llm-jax export` directory nor a run directory")
    save_file = _safetensors_numpy().save_file
    from llm_jax.checkpoint import load_for_inference
    from llm_jax.config import from_dict
    if (export_dir / "config.json").is_file():  # refuse before reading any weights
        _family(from_dict(json.loads((export_dir / "config.json").read_text())).model)
    cfg, params, tok = load_for_inference(export_dir)
    m = cfg.model
    family = _family(m)
    import jax
    params = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)
    if m.scan_layers:
        params = _unstack_layers(params, m.n_layers)
    weights = _gpt2_weights(m, params) if family == "gpt2" else _llama_weights(m, params)
    weights = {k: np.ascontiguousarray(v, np.float32) for k, v in weights.items()}
    hf = _hf_config(m, family, tok)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf, indent=2))
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"]}, indent=2))
    data = tok.serialized()
    (tmp / ("tokenizer.json" if data.lstrip()[:1] == b"{" else "tokenizer.model")).write_bytes(data)
    tmp.rename(out)
    return hf
