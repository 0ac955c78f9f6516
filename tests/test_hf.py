"""Hugging Face import/export (llm_jax.interop.hf): logits parity with transformers on tiny random GPT-2, Llama
and Qwen2 models, the round trip back to transformers, PyTorch pickle weights read safely, refusals, and the
byte-level BPE tokenizers (GPT-2's, Qwen2's)."""
import json
import sys

import numpy as np
import pytest

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the [hf] extra "
                                   "(pip install -e '.[hf]') and torch")
torch = pytest.importorskip("torch", reason="the Hugging Face parity tests need torch")

import jax.numpy as jnp  # noqa: E402
import sentencepiece as spm  # noqa: E402

from llm_jax.config import gpt2, llama  # noqa: E402
from llm_jax.data.byte_bpe import ByteLevelBPETokenizer  # noqa: E402
from llm_jax.data.tokenizer import Tokenizer  # noqa: E402
from llm_jax.errors import DataError  # noqa: E402
from llm_jax.interop.hf import HFError, _family, export_hf, import_hf  # noqa: E402
from llm_jax.model import Transformer  # noqa: E402
from llm_jax.train.export import load_for_inference  # noqa: E402

TEXT = ["the cat sat on the mat and the dog ate the hat", "a bat and a rat ran to the mat at dawn",
        "hello world, this is a tiny corpus for a tiny tokenizer"] * 20
MIXED = "Hello, world! The quick brown fox.\n  Indented\tline — 你好，世界。 Emoji: 😀🚀 é"


def spm_tokenizer(path):
    import io
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT), model_writer=model, vocab_size=100,
                                   model_type="bpe", minloglevel=2)
    path.write_bytes(model.getvalue())


QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
               r"\s+(?!\S)|\s+")


def bpe_tokenizer_json(vocab_size=300, style="gpt2") -> str:
    """A byte-level BPE tokenizer.json: GPT-2's (ByteLevel pre-tokenizer, <|endoftext|> first), or Qwen2's (NFC,
    its Split regex then ByteLevel without regex, the special tokens added after the vocabulary)."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.decoder = decoders.ByteLevel()
    if style == "gpt2":
        tok.pre_tokenizer, specials = pre_tokenizers.ByteLevel(add_prefix_space=False), ["<|endoftext|>"]
    else:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        specials = []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT + [MIXED] * 3, trainer)
    if style == "qwen2":
        tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return tok.to_str()


def tiny_hf(kind: str, tied: bool, vocab_size: int = 100):
    """A random transformers model: gpt2, llama or qwen2 (Llama's shape, grouped KV heads, q/k/v biases)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab_size, n_positions=64,
                                         tie_word_embeddings=tied)
    else:
        config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[kind](
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            vocab_size=vocab_size, max_position_embeddings=64, rope_theta=500.0, tie_word_embeddings=tied)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # move every weight (norm scales and biases too) away from its init
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def jax_logits(cfg, params, tokens):
    b, t = tokens.shape
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
    return np.asarray(Transformer(cfg.model).apply({"params": params}, jnp.asarray(tokens), positions,
                                                   jnp.ones((b, t), jnp.int32)))


# (kind, tied, scan, weights); the scanned cases are also saved in shards (model.safetensors.index.json)
CASES = {"gpt2": ("gpt2", True, False, "safetensors"), "gpt2-pickle": ("gpt2", True, False, "pickle"),
         "llama-untied": ("llama", False, False, "safetensors"), "llama-tied": ("llama", True, False, "safetensors"),
         "llama-scanned": ("llama", False, True, "sharded"), "qwen2-untied": ("qwen2", False, False, "safetensors"),
         "qwen2-tied-scanned": ("qwen2", True, True, "sharded")}


@pytest.mark.slow
@pytest.mark.parametrize("kind,tied,scan,weights", CASES.values(), ids=CASES.keys())
def test_import_matches_transformers_and_export_round_trips(tmp_path, kind, tied, scan, weights):
    model = tiny_hf(kind, tied)
    hf_dir = tmp_path / "hf"
    if weights == "pickle":
        save_pickle_weights(model, hf_dir)
    else:
        model.save_pretrained(hf_dir, **({"max_shard_size": "20KB"} if weights == "sharded" else {}))
    assert (hf_dir / "model.safetensors.index.json").is_file() == (weights == "sharded")
    spm_tokenizer(hf_dir / "tokenizer.model")
    cfg = import_hf(hf_dir, tmp_path / "export", scan_layers=scan)
    m = cfg.model
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.tie_embeddings, m.scan_layers) == (100, 32, 2, 4, tied,
                                                                                                  scan)
    assert m.qkv_bias == (kind == "qwen2")
    assert m.n_kv_heads == (4 if kind == "gpt2" else 2) and m.max_seq_len == 64 and cfg.data.seq_len == 64
    assert (tmp_path / "export" / "step").read_text().strip() == "0"
    cfg2, params, tok = load_for_inference(tmp_path / "export")
    assert cfg2 == cfg and tok.vocab_size == 100
    # the sentencepiece dummy prefix is turned off: token bytes add up to the text's
    assert not spm.SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model")).encode("the", out_type=str)[
        0].startswith("the")
    ids = tok.encode(TEXT[0])
    assert tok.decode_bytes(ids) == TEXT[0].encode() and tok.byte_lengths()[ids].sum() == len(TEXT[0])
    rng = np.random.default_rng(1)
    for t in (1, 7, 33):
        tokens = rng.integers(0, 100, (2, t)).astype(np.int32)
        want = hf_logits(model, tokens)
        assert want.std() > 0.1  # perturbed weights: logits far from zero, so a wrong mapping would show
        np.testing.assert_allclose(jax_logits(cfg, params, tokens), want, atol=1e-4, rtol=0, err_msg=f"length {t}")

    hf_config = export_hf(tmp_path / "export", tmp_path / "back")
    assert hf_config["model_type"] == kind
    exported_tokenizer = (tmp_path / "export" / "tokenizer.model").read_bytes()
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == exported_tokenizer
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager")
    back = back.float().eval()
    tokens = rng.integers(0, 100, (2, 33)).astype(np.int32)
    np.testing.assert_allclose(hf_logits(back, tokens), hf_logits(model, tokens), atol=1e-5, rtol=0)


def save_pickle_weights(model, hf_dir, shards=1):
    """The model as transformers 4 saved it with safe_serialization=False (transformers 5 writes safetensors only):
    config.json and pytorch_model.bin, or `shards` pytorch_model-*.bin with their index."""
    model.config.save_pretrained(hf_dir)
    state = model.state_dict()
    if shards == 1:
        torch.save(state, hf_dir / "pytorch_model.bin")
        return
    names, weight_map = list(state), {}
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k] for k in names[i::shards]}, hf_dir / file)
        weight_map.update({k: file for k in names[i::shards]})
    (hf_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_pytorch_pickle_weights_import_as_their_safetensors(tmp_path):
    """pytorch_model.bin, sharded or not, gives the safetensors' weights (bf16 widened alike) and params; where both
    are there, safetensors are read. (The logits: the gpt2-pickle case above.)"""
    import jax
    from llm_jax.interop.safetensors_io import read_weights
    model, half = tiny_hf("gpt2", True), tiny_hf("llama", False).to(torch.bfloat16)
    for name, m, shards in (("bin", model, 1), ("sharded", model, 3), ("st", model, 1), ("half-bin", half, 1)):
        save_pickle_weights(m, tmp_path / name, shards)
    model.save_pretrained(tmp_path / "st")
    half.save_pretrained(tmp_path / "half-st")
    (tmp_path / "st" / "pytorch_model.bin").write_bytes(b"never read: safetensors come first")
    for pickled, safe in (("bin", "st"), ("sharded", "st"), ("half-bin", "half-st")):
        got, want = read_weights(tmp_path / pickled), read_weights(tmp_path / safe)
        assert got.keys() >= want.keys()  # GPT-2's pickle also holds the tied lm_head.weight
        for key, w in want.items():
            assert got[key].dtype == w.dtype == np.float32, key
            np.testing.assert_array_equal(got[key], w, err_msg=key)
    for name in ("bin", "st"):
        spm_tokenizer(tmp_path / name / "tokenizer.model")
        import_hf(tmp_path / name, tmp_path / f"{name}-export")
    _, from_pickle, _ = load_for_inference(tmp_path / "bin-export")
    _, from_safetensors, _ = load_for_inference(tmp_path / "st-export")
    jax.tree.map(np.testing.assert_array_equal, from_pickle, from_safetensors)


class _RunsCode:
    def __reduce__(self):
        import os
        return os.system, ("touch pwned",)


def test_pickle_weights_unsupported_models_and_configs_are_refused(tmp_path, monkeypatch):
    import argparse
    monkeypatch.chdir(tmp_path)
    hf_dir = tmp_path / "bin"
    hf_dir.mkdir()
    tiny_hf("llama", False).config.to_json_file(hf_dir / "config.json")
    spm_tokenizer(hf_dir / "tokenizer.model")
    weights = {"model.embed_tokens.weight": torch.zeros(100, 32)}
    for extra, words in ((_RunsCode(), "system"), (argparse.Namespace(lr=1.0), "GLOBAL argparse.Namespace"),
                         (None, "Unsupported operand")):
        if extra is None:  # not even a pickle
            (hf_dir / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
        else:
            torch.save({**weights, "extra": extra}, hf_dir / "pytorch_model.bin")
        with pytest.raises(HFError, match="needs a full unpickler") as e:
            import_hf(hf_dir, tmp_path / "out")
        message = str(e.value)
        assert "\n" not in message and str(hf_dir / "pytorch_model.bin") in message and words in message
        assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()
    torch.save({**weights, "version": 3}, hf_dir / "pytorch_model.bin")  # non-tensor entries are skipped
    with pytest.raises(HFError, match="weight model.layers.0.self_attn.q_proj.weight is missing"):
        import_hf(hf_dir, tmp_path / "out")
    with monkeypatch.context() as without_torch:
        without_torch.setitem(sys.modules, "torch", None)
        with pytest.raises(HFError, match=r"pytorch_model.bin is a PyTorch pickle, which needs torch: pip install "
                                          r"-e '.\[hf\]'$"):
            import_hf(hf_dir, tmp_path / "out")

    config = json.loads((hf_dir / "config.json").read_text())
    for change, words in (({"attention_bias": True}, "attention_bias"), ({"model_type": "bert"}, "model_type"),
                          ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling"),
                          ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope scaling")):
        (hf_dir / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(HFError, match=words):
            import_hf(hf_dir, tmp_path / "out")

    assert _family(llama()) == "llama" and _family(gpt2()) == "gpt2" and _family(llama(qkv_bias=True)) == "qwen2"
    for model, task, words in ((llama(), "reward", "head"), (llama(use_bias=True), "pretrain", "neither"),
                               (gpt2(tie_embeddings=False), "pretrain", "output bias"),
                               (gpt2(n_kv_heads=2), "pretrain", "grouped")):
        with pytest.raises(HFError, match=words):
            _family(model, task)


def test_qwen2_sliding_window_caps_the_context_only_where_a_layer_slides():
    from llm_jax.interop.hf_config import hf_model_config
    config = transformers.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                      vocab_size=100, max_position_embeddings=64).to_dict()
    assert config["use_sliding_window"] is False and hf_model_config(config)[1] == 64
    for change, context in (({"sliding_window": 16}, 64), ({"sliding_window": 16, "use_sliding_window": True}, 64),
                            ({"sliding_window": 16, "use_sliding_window": True, "max_window_layers": 1}, 16),
                            ({"sliding_window": 100, "use_sliding_window": True, "max_window_layers": 0}, 64),
                            ({"sliding_window": 16, "use_sliding_window": True,
                              "layer_types": ["full_attention", "sliding_attention"]}, 16)):
        # transformers writes layer_types into config.json; those of older files follow max_window_layers
        model, got = hf_model_config({**{k: v for k, v in config.items() if k != "layer_types"}, **change})
        assert got == context and model.max_seq_len == 64 and model.qkv_bias, change


@pytest.mark.parametrize("style", ["gpt2", "qwen2"])
def test_byte_level_bpe_tokenizer_is_exact_in_bytes(tmp_path, style):
    path = tmp_path / "tokenizer.json"
    path.write_text(bpe_tokenizer_json(style=style))
    specials = [t["id"] for t in json.loads(path.read_text())["added_tokens"]]
    tok = Tokenizer.load(path)
    assert isinstance(tok, ByteLevelBPETokenizer)
    (tmp_path / "copy.model").write_bytes(path.read_bytes())
    # recognised by its content too (an export keeps it under the name tokenizer.model)
    assert Tokenizer.load(tmp_path / "copy.model").sha256 == tok.sha256
    lengths = tok.byte_lengths()
    eot = tok.eos_id
    assert tok.vocab_size == 300 + len(specials) * (style == "qwen2") and eot == specials[0]
    assert not lengths[specials].any() and tok.decode_bytes(specials) == b"" and tok.bos_id == tok.pad_id == eot
    for text in (MIXED, "plain english words", "中文文本测试", "🚀😀🎉 emoji", "<|endoftext|> typed",
                 "<|im_start|>user\nhi<|im_end|>\n", "it's 2024!\r\n\n  x", ""):
        ids = tok.encode(text)
        assert not set(specials) & set(ids)  # special tokens are never produced from text
        assert tok.decode_bytes(ids) == text.encode() and tok.decode(ids) == text
        assert int(lengths[ids].sum()) == len(text.encode())
    assert tok.encode_batch([MIXED, "a"]) == [tok.encode(MIXED), tok.encode("a")]
    assert tok.decode_bytes(np.array(tok.encode(MIXED))) == MIXED.encode()
    import pickle
    assert pickle.loads(pickle.dumps(tok)).encode(MIXED) == tok.encode(MIXED)
    # Special tokens spelt in a sample prompt become their ids.
    assert tok.encode_prompt("<|endoftext|>a b") == [eot, *tok.encode("a b")]
    # Qwen2's tokenizer normalises to NFC: text not in NFC counts (and gives back) its NFC bytes, and compress,
    # which must give back its input, refuses it.
    assert tok.lossless == (style == "gpt2")
    decomposed = "cafe\u0301 \u2126"
    if style == "qwen2":
        from llm_jax.inference.codec import to_tokens
        assert tok.scored_bytes(decomposed) == "caf\u00e9 \u03a9".encode()
        with pytest.raises(DataError, match="cannot reproduce the input.*byte 3"):
            to_tokens(decomposed.encode(), tok)
        assert tok.decode_bytes(to_tokens("café Ω".encode(), tok)) == "café Ω".encode()
    else:
        assert tok.scored_bytes(decomposed) == decomposed.encode()


def sft_three_steps(tmp_path, experiment: str, run_dir):
    """Three SFT steps of `experiment` on tmp_path/export, through the export's chat template."""
    from llm_jax.cli.main import main
    dialogues = tmp_path / "chats.jsonl"
    dialogues.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "the cat"},
                                                          {"role": "assistant", "content": "sat on the mat"}]}) + "\n"
                                 for _ in range(10)))
    assert main(["train", "--config", experiment, "--run-dir", str(run_dir), "--set", f"data.sources=chat:{dialogues}",
                 "--set", f"checkpoint.init_from={tmp_path / 'export'}", "--set", "data.seq_len=32", "--set",
                 "train.steps=3", "--set", "train.eval_every=1000"]) == 0

@pytest.mark.slow
def test_gpt2_with_its_tokenizer_json_imports_and_exports(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=300, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir, safe_serialization=True)
    (hf_dir / "tokenizer.json").write_text(bpe_tokenizer_json())
    import_hf(hf_dir, tmp_path / "export")
    cfg, params, tok = load_for_inference(tmp_path / "export")
    assert isinstance(tok, ByteLevelBPETokenizer) and cfg.data.seq_len == 32
    tokens = np.array([tok.encode("the cat sat on the mat")], np.int32)
    np.testing.assert_allclose(jax_logits(cfg, params, tokens), hf_logits(model, tokens), atol=1e-4, rtol=0)
    export_hf(tmp_path / "export", tmp_path / "back")
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    assert json.loads((tmp_path / "back" / "config.json").read_text())["eos_token_id"] == tok.eos_id
    # SFT on the import: its tokenizer has no llm_jax chat tokens, so the tags are written as text.
    sft_three_steps(tmp_path, "sft_tiny", tmp_path / "sft")
    assert json.loads((tmp_path / "sft" / "results.json").read_text())["eval/bits_per_byte"] > 0


@pytest.mark.slow
def test_qwen2_with_its_tokenizer_json_and_a_lora_run_export(tmp_path):
    """A Qwen2 import with its tokenizer.json, LoRA-tuned: export-hf writes the base (tokenizer.json byte for byte)
    and a PEFT adapter that transformers + peft load to our logits (q/k/v biases stay in the frozen base)."""
    peft_lib = pytest.importorskip("peft", reason="the PEFT parity tests need the [hf] extra")
    from llm_jax.cli.main import main
    model = tiny_hf("qwen2", False, vocab_size=303)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    (hf_dir / "tokenizer.json").write_text(bpe_tokenizer_json(style="qwen2"))
    assert main(["import-hf", str(hf_dir), str(tmp_path / "export")]) == 0
    cfg, params, tok = load_for_inference(tmp_path / "export")
    assert isinstance(tok, ByteLevelBPETokenizer) and cfg.model.qkv_bias and cfg.data.seq_len == 64
    assert cfg.data.chat_template == "chatml"  # picked for its <|im_start|>/<|im_end|>
    im_start, im_end = 301, 302  # Qwen2's chat tokens: special, added after the vocabulary
    tokens = np.array([[im_start, *tok.encode("user\nthe cat sat"), im_end]], np.int32)
    np.testing.assert_allclose(jax_logits(cfg, params, tokens), hf_logits(model, tokens), atol=1e-4, rtol=0)
    assert main(["export-hf", str(tmp_path / "export"), str(tmp_path / "base")]) == 0
    assert (tmp_path / "base" / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    generation = json.loads((tmp_path / "base" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.eos_id, im_end]  # transformers stops where chatml's turn ends

    sft_three_steps(tmp_path, "sft_lora_tiny", tmp_path / "lora")
    assert main(["export-hf", str(tmp_path / "lora"), str(tmp_path / "adapter")]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").float()
    assert type(base).__name__ == "Qwen2ForCausalLM"
    loaded = peft_lib.PeftModel.from_pretrained(base.eval(), tmp_path / "adapter").eval()
    cfg, params, _ = load_for_inference(tmp_path / "lora")  # LoRA folded onto the base
    want = hf_logits(loaded, tokens)
    assert np.abs(want - hf_logits(model, tokens)).max() > 1e-3  # the 3 steps moved the adapters
    np.testing.assert_allclose(jax_logits(cfg, params, tokens), want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_bfloat16_weights_are_widened_and_the_cli_samples_and_evaluates(tmp_path, capsys):
    from llm_jax.cli.main import main
    model = tiny_hf("llama", False).to(torch.bfloat16)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir, safe_serialization=True)
    spm_tokenizer(hf_dir / "tokenizer.model")
    assert main(["import-hf", str(hf_dir), str(tmp_path / "export")]) == 0
    assert "imported a 2-layer" in capsys.readouterr().out
    cfg, params, _ = load_for_inference(tmp_path / "export")
    tokens = np.random.default_rng(0).integers(0, 100, (1, 9)).astype(np.int32)
    # transformers' own float32 load of the bf16 files (model.float() would keep a bf16-rounded RoPE inv_freq)
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                                  attn_implementation="eager").eval()
    np.testing.assert_allclose(jax_logits(cfg, params, tokens), hf_logits(reference, tokens), atol=1e-4, rtol=0)
    assert main(["sample", "--checkpoint", str(tmp_path / "export"), "--prompt", "the cat", "--max-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("the cat")
    (tmp_path / "text.txt").write_text(" ".join(TEXT))
    assert main(["eval", "--checkpoint", str(tmp_path / "export"), "--text", str(tmp_path / "text.txt"),
                 "--json"]) == 0
