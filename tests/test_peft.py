"""Parameter-efficient fine-tuning (peft.*): LoRA, prompt and prefix tuning start as the base model, fold and
decode exactly, fine-tune a real run whose checkpoints hold the adapters only, and LoRA adapters go to and from
Hugging Face PEFT with the same logits. (Mesh equality and the frozen base: tests/test_sharding.py; a DPO run with
LoRA killed and resumed: tests/test_restart.py.)"""
import dataclasses
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn

from conftest import set_flags
from llm_jax.cli.main import main
from llm_jax.config import PeftConfig, llama, validate
from llm_jax.errors import ConfigError
from llm_jax.experiment import apply_overrides, load_experiment
from llm_jax.inference.generate import Generator, Sampling
from llm_jax.inference.runner import ModelRunner
from llm_jax.model import Transformer, adapters
from llm_jax.train.checkpoint import checkpoint_dir, committed_steps
from llm_jax.train.export import load_adapters, load_for_inference

METHODS = ("lora", "prompt", "prefix")
CFG = llama(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, compute_dtype="float32")


def inputs(b=2, t=9, seed=1):
    tokens = jax.random.randint(jax.random.key(seed), (b, t), 0, CFG.vocab_size)
    return tokens, jnp.tile(jnp.arange(t), (b, 1)), jnp.ones((b, t), jnp.int32)


def peft_params(method, scan, moved=True):
    """(model config, peft config, params) of a model with adapters, these moved away from their init."""
    cfg = dataclasses.replace(CFG, scan_layers=scan)
    p = PeftConfig(method=method, rank=4, alpha=8.0, virtual_tokens=3)
    params = nn.unbox(jax.jit(Transformer(cfg, peft=p).init)(jax.random.key(0), *inputs())["params"])
    if moved:
        rng = np.random.default_rng(7)
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x + 0.3 * rng.standard_normal(x.shape, np.float32) if str(path[-1].key) in
            adapters.ADAPTERS else x, params)
    return cfg, p, params


def apply(cfg, p, params, args=None):
    """The model's logits, jitted (a tiny model's eager forward pass is slower than compiling it)."""
    return jax.jit(lambda params, args: Transformer(cfg, peft=p).apply({"params": params}, *args))(
        params, inputs() if args is None else args)


# The unrolled layers (model.scan_layers=false) take the same code path per layer: the fast subset leaves them out.
SCANS = pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["scanned", "unrolled"])


@SCANS
@pytest.mark.parametrize("method", METHODS)
def test_adapters_start_as_the_base_and_without_them_the_model_is_the_base(method, scan):
    cfg, p, params = peft_params(method, scan, moved=False)
    trained, base = adapters.split(params)
    assert {str(path[-1].key) for path, _ in jax.tree_util.tree_flatten_with_path(trained)[0]} <= set(
        adapters.ADAPTERS)
    plain = apply(cfg, PeftConfig(), base)
    np.testing.assert_allclose(apply(cfg, p, params), plain, atol=1e-6)
    _, _, moved = peft_params(method, scan)
    assert np.abs(np.asarray(apply(cfg, p, moved) - plain)).max() > 1e-2  # the moved adapters do change the model
    # the same model on params without adapters (DPO's and RL's reference): the base, exactly
    np.testing.assert_array_equal(apply(cfg, p, adapters.split(moved)[1]), plain)


@SCANS
def test_lora_folds_into_the_kernels(scan):
    cfg, p, params = peft_params("lora", scan)
    folded = adapters.fold_lora(params, p)
    assert not {str(path[-1].key) for path, _ in jax.tree_util.tree_flatten_with_path(folded)[0]} & set(adapters.LORA)
    np.testing.assert_allclose(apply(cfg, PeftConfig(), folded), apply(cfg, p, params), atol=1e-5)


@pytest.mark.parametrize("method", [pytest.param("lora", marks=pytest.mark.slow), "prompt", "prefix"])
def test_decoding_with_the_kv_cache_is_the_full_forward(method):
    """Greedy generation (prefill, then one token per step against the cache) picks the argmax of the whole
    sequence's forward pass at every step: the virtual tokens are seen the same way in both."""
    cfg, p, params = peft_params(method, scan=True)
    prompt = [5, 9, 11, 3]
    got = Generator(ModelRunner(cfg, params, peft=p), Sampling(temperature=0)).generate([prompt], 6)[0]
    seq = jnp.asarray([prompt + got])
    t = seq.shape[1]
    logits = apply(cfg, p, params, (seq, jnp.arange(t)[None], jnp.ones((1, t), jnp.int32)))
    assert got == jnp.argmax(logits[0, len(prompt) - 1:-1], axis=-1).tolist()


def test_lora_dropout_only_where_a_dropout_key_is_given():
    """peft.dropout drops the adapters' input in train steps (which pass a key); evaluation and decoding pass none
    and see the whole update, so they match dropout=0."""
    cfg, _, params = peft_params("lora", scan=True)
    dropped = PeftConfig(method="lora", rank=4, alpha=8.0, dropout=0.5)
    model = Transformer(cfg, peft=dropped)
    run = jax.jit(lambda key: model.apply({"params": params}, *inputs(), rngs={"dropout": key}))
    a, b = run(jax.random.key(1)), run(jax.random.key(2))
    assert np.abs(np.asarray(a - b)).max() > 1e-3  # a different mask per key
    np.testing.assert_array_equal(a, run(jax.random.key(1)))
    np.testing.assert_allclose(apply(cfg, dropped, params), apply(cfg, dataclasses.replace(dropped, dropout=0.0),
                                                                  params), atol=1e-6)


def test_peft_config_errors_name_the_key(tmp_path, capsys):
    base = apply_overrides(load_experiment("sft_tiny"), ["peft.method=lora", "checkpoint.init_from=x"])
    for sets, message in ((["peft.rank=0"], "peft.rank=0"), (["peft.method=dora"], "peft.method='dora'"),
                          (["peft.targets=("], "peft.targets"), (["peft.dropout=1"], "peft.dropout=1")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            validate(apply_overrides(base, sets))
    assert main(["train", "--config", "pretrain_tiny", "--run-dir", str(tmp_path / "run"),
                 *set_flags(["peft.method=lora"])]) == 2
    err = capsys.readouterr().err
    assert "checkpoint.init_from" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------- a real run

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_export):
    """sft_lora_tiny (LoRA r=8) from the tiny export on a few dialogues; the run directory and its argv."""
    root = tmp_path_factory.mktemp("lora")
    dialogues = root / "d.jsonl"
    dialogues.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"say {w}"},
                                                          {"role": "assistant", "content": f"{w}!"}]}) + "\n"
                                 for w in ("yes", "no", "maybe", "hello") * 10))
    argv = lambda run_dir, *more: ["train", "--config", "sft_lora_tiny", "--run-dir", str(run_dir), *set_flags([  # noqa
        f"data.sources=chat:{dialogues}", f"checkpoint.init_from={tiny_export}", "train.steps=20",
        "train.eval_every=10", "checkpoint.every=10", *more])]
    assert main(argv(root / "run")) == 0
    return root / "run", argv


@pytest.mark.slow
def test_a_lora_run_checkpoints_only_adapters_and_its_merged_export_is_the_same_model(lora_run, tiny_export, tmp_path,
                                                                                      capsys):
    run_dir, argv = lora_run
    cfg, trained = load_adapters(run_dir)
    names = {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(trained)[0]}
    assert names == set(adapters.LORA) and all(np.any(np.asarray(x)) for x in jax.tree.leaves(trained))
    saved = ocp.StandardCheckpointer().metadata(checkpoint_dir(run_dir) / "20" / "state").item_metadata
    leaves = lambda tree: jax.tree_util.tree_flatten_with_path(tree)[0]  # noqa: E731
    assert {str(path[-1].key) for path, _ in leaves(saved["params"])} == set(adapters.LORA)  # no base weight
    assert {a.shape for _, a in leaves(saved["opt_state"]) if a.shape} == {x.shape for x in jax.tree.leaves(trained)}

    assert main(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "plain")]) == 2
    assert "--merge" in capsys.readouterr().err and not (tmp_path / "plain").exists()
    assert main(["export", "--run-dir", str(run_dir), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged_cfg, merged, _ = load_for_inference(tmp_path / "merged")
    assert merged_cfg.peft.method == "none"  # an ordinary export: LoRA folded into the kernels
    base_cfg, base, _ = load_for_inference(tiny_export)
    tokens, positions, segments = inputs(t=12)
    unmerged = Transformer(cfg.model, peft=cfg.peft).apply({"params": adapters.merge(trained, base)}, tokens, positions,
                                                           segments)
    np.testing.assert_allclose(Transformer(merged_cfg.model).apply({"params": merged}, tokens, positions, segments),
                               unmerged, atol=1e-5)
    assert np.abs(np.asarray(unmerged - Transformer(base_cfg.model).apply({"params": base}, tokens, positions,
                                                                          segments))).max() > 1e-3

    # the same run directory resumed against another base: one line naming the mismatch, nothing changed
    resumed = tmp_path / "resumed"
    shutil.copytree(run_dir, resumed)
    capsys.readouterr()
    assert main(argv(resumed, f"checkpoint.init_from={tmp_path / 'merged'}", "train.steps=30")) == 2
    err = capsys.readouterr().err
    assert "another base model" in err and len(err.strip().splitlines()) == 1, err
    assert committed_steps(resumed) == committed_steps(run_dir)


# ---------------------------------------------------------------------------------------------- Hugging Face PEFT

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_lora_adapters_load_both_ways_with_the_same_logits(tmp_path, kind):
    """A PEFT LoRA adapter (random A and B) folded in by import-hf gives PEFT's logits; our LoRA params written as a
    PEFT adapter and loaded by peft onto the same base give ours."""
    peft_lib = pytest.importorskip("peft", reason="the PEFT parity tests need the [hf] extra")
    torch = pytest.importorskip("torch")
    from test_hf import hf_logits, jax_logits, spm_tokenizer, tiny_hf
    from llm_jax.interop.hf import _family, import_hf
    from llm_jax.interop.hf_params import unstacked_layers
    from llm_jax.interop.hf_peft import adapter_weights, write_adapter
    model = tiny_hf(kind, tied=kind == "gpt2")
    model.save_pretrained(tmp_path / "base", safe_serialization=True)
    spm_tokenizer(tmp_path / "base" / "tokenizer.model")
    targets = ["c_attn", "c_proj", "c_fc"] if kind == "gpt2" else ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                    "up_proj", "down_proj"]
    torch.manual_seed(1)
    hf_lora = peft_lib.get_peft_model(model, peft_lib.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                 init_lora_weights=False,
                                                                 fan_in_fan_out=kind == "gpt2")).eval()
    hf_lora.save_pretrained(tmp_path / "adapter")
    tokens = np.random.default_rng(0).integers(0, 100, (2, 17)).astype(np.int32)
    want = hf_logits(hf_lora, tokens)
    base_logits = hf_logits(hf_lora.get_base_model().__class__.from_pretrained(tmp_path / "base").eval(), tokens)
    assert np.abs(want - base_logits).max() > 1e-2  # the adapter matters
    cfg = import_hf(tmp_path / "base", tmp_path / "folded", adapter=tmp_path / "adapter")
    _, folded, _ = load_for_inference(tmp_path / "folded")
    np.testing.assert_allclose(jax_logits(cfg, folded, tokens), want, atol=1e-4, rtol=0)

    # ours -> PEFT: LoRA params on the imported base, written as a PEFT adapter
    import_hf(tmp_path / "base", tmp_path / "ours")
    cfg, base, _ = load_for_inference(tmp_path / "ours")
    p = PeftConfig(method="lora", rank=4, alpha=8.0, targets=r"(^|/)(q|k|v|o|up|gate|down|lm_head)/kernel$")
    init = nn.unbox(Transformer(cfg.model, peft=p).init(jax.random.key(0), *(jnp.ones((1, 1), jnp.int32),) * 3))
    key = iter(jax.random.split(jax.random.key(3), 128))
    lora = jax.tree.map(lambda x: 0.2 * jax.random.normal(next(key), x.shape), adapters.split(init["params"])[0])
    ours = np.asarray(Transformer(cfg.model, peft=p).apply({"params": adapters.merge(lora, base)}, tokens,
                                                           np.broadcast_to(np.arange(17), tokens.shape),
                                                           np.ones_like(tokens)))
    family = _family(cfg.model)
    tensors, ranks = adapter_weights(family, unstacked_layers(cfg.model, lora), lora.get("lm_head"), 4)
    (tmp_path / "exported").mkdir()
    write_adapter(tmp_path / "exported", family, tensors, ranks, 4, 8.0, str(tmp_path / "ours"))
    hf_base = hf_lora.get_base_model().__class__.from_pretrained(tmp_path / "base", attn_implementation="eager")
    loaded = peft_lib.PeftModel.from_pretrained(hf_base.float().eval(), tmp_path / "exported").eval()
    np.testing.assert_allclose(hf_logits(loaded, tokens), ours, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_export_hf_of_a_lora_run_is_a_peft_adapter_for_the_exported_base(lora_run, tiny_export, tmp_path):
    peft_lib = pytest.importorskip("peft", reason="the PEFT parity tests need the [hf] extra")
    transformers = pytest.importorskip("transformers")
    from test_hf import hf_logits
    run_dir, _ = lora_run
    assert main(["export-hf", str(tiny_export), str(tmp_path / "base")]) == 0
    assert main(["export-hf", str(run_dir), str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", attn_implementation="eager").float()
    loaded = peft_lib.PeftModel.from_pretrained(hf.eval(), tmp_path / "adapter").eval()
    cfg, params, _ = load_for_inference(run_dir)  # LoRA folded onto the base
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 15)).astype(np.int32)
    ours = Transformer(cfg.model).apply({"params": params}, tokens, np.broadcast_to(np.arange(15), tokens.shape),
                                        np.ones_like(tokens))
    np.testing.assert_allclose(hf_logits(loaded, tokens), np.asarray(ours), atol=1e-4, rtol=0)
