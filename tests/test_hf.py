"""Hugging Face import/export (llm_jax.interop.hf): logits parity with transformers on tiny random GPT-2 and
Llama models, the round trip back to transformers, refusals, and the byte-level BPE (GPT-2) tokenizer."""
import json

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


def bpe_tokenizer_json(vocab_size=300) -> str:
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT + [MIXED] * 3, trainer)
    return tok.to_str()


def tiny_hf(kind: str, tied: bool):
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
                                         tie_word_embeddings=tied)
    else:
        config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64, vocab_size=100,
                                          max_position_embeddings=64, rope_theta=500.0, tie_word_embeddings=tied)
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


CASES = [("gpt2", True, False), ("llama", False, False), ("llama", True, False), ("llama", False, True)]


@pytest.mark.slow
@pytest.mark.parametrize("kind,tied,scan", CASES, ids=["gpt2", "llama-untied", "llama-tied", "llama-scanned"])
def test_import_matches_transformers_and_export_round_trips(tmp_path, kind, tied, scan):
    model = tiny_hf(kind, tied)
    hf_dir = tmp_path / "hf"
    # the scanned case is also saved in shards (model.safetensors.index.json)
    model.save_pretrained(hf_dir, safe_serialization=True, **({"max_shard_size": "20KB"} if scan else {}))
    assert (hf_dir / "model.safetensors.index.json").is_file() == scan
    spm_tokenizer(hf_dir / "tokenizer.model")
    cfg = import_hf(hf_dir, tmp_path / "export", scan_layers=scan)
    m = cfg.model
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.tie_embeddings, m.scan_layers) == (100, 32, 2, 4, tied,
                                                                                                  scan)
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


def test_pickle_weights_unsupported_models_and_configs_are_refused(tmp_path):
    hf_dir = tmp_path / "bin"
    hf_dir.mkdir()
    tiny_hf("llama", False).config.to_json_file(hf_dir / "config.json")
    (hf_dir / "pytorch_model.bin").write_bytes(b"\x80\x02pickle")
    spm_tokenizer(hf_dir / "tokenizer.model")
    with pytest.raises(HFError, match="pickle") as e:
        import_hf(hf_dir, tmp_path / "out")
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()

    config = json.loads((hf_dir / "config.json").read_text())
    for change, words in (({"attention_bias": True}, "attention_bias"), ({"model_type": "bert"}, "model_type"),
                          ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling"),
                          ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope scaling")):
        (hf_dir / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(HFError, match=words):
            import_hf(hf_dir, tmp_path / "out")

    assert _family(llama()) == "llama" and _family(gpt2()) == "gpt2"
    for model, task, words in ((llama(), "reward", "head"), (llama(use_bias=True), "pretrain", "neither"),
                               (gpt2(tie_embeddings=False), "pretrain", "output bias"),
                               (gpt2(n_kv_heads=2), "pretrain", "grouped")):
        with pytest.raises(HFError, match=words):
            _family(model, task)


def test_byte_level_bpe_tokenizer_is_exact_in_bytes(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(bpe_tokenizer_json())
    tok = Tokenizer.load(path)
    assert isinstance(tok, ByteLevelBPETokenizer)
    (tmp_path / "copy.model").write_bytes(path.read_bytes())
    # recognised by its content too (an export keeps it under the name tokenizer.model)
    assert Tokenizer.load(tmp_path / "copy.model").sha256 == tok.sha256
    lengths = tok.byte_lengths()
    eot = tok.eos_id
    assert tok.vocab_size == 300 and lengths[eot] == 0 and tok.bos_id == tok.pad_id == eot
    for text in (MIXED, "plain english words", "中文文本测试", "🚀😀🎉 emoji", "<|endoftext|> typed", ""):
        ids = tok.encode(text)
        assert eot not in ids  # special tokens are never produced from text
        assert tok.decode_bytes(ids) == text.encode() and tok.decode(ids) == text
        assert int(lengths[ids].sum()) == len(text.encode())
    assert tok.encode_batch([MIXED, "a"]) == [tok.encode(MIXED), tok.encode("a")]
    assert tok.decode_bytes(np.array(tok.encode(MIXED))) == MIXED.encode()
    import pickle
    assert pickle.loads(pickle.dumps(tok)).encode(MIXED) == tok.encode(MIXED)


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
    from llm_jax.cli.main import main
    dialogues = tmp_path / "chats.jsonl"
    dialogues.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "the cat"},
                                                          {"role": "assistant", "content": "sat on the mat"}]}) + "\n"
                                 for _ in range(10)))
    assert main(["train", "--config", "sft_tiny", "--run-dir", str(tmp_path / "sft"), "--set",
                 f"data.sources=chat:{dialogues}", "--set", f"checkpoint.init_from={tmp_path / 'export'}",
                 "--set", "data.seq_len=32", "--set", "train.steps=3", "--set", "train.eval_every=1000"]) == 0
    assert json.loads((tmp_path / "sft" / "results.json").read_text())["eval/bits_per_byte"] > 0


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
