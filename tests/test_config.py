import dataclasses

import pytest

from llm_jax import tasks
from llm_jax.config import Config, from_dict, gpt2, llama, to_dict, validate
from llm_jax.errors import ConfigError
from llm_jax.experiment import EXPERIMENTS_DIR, apply_overrides, load_experiment


def test_overrides_parse_by_field_type():
    cfg = apply_overrides(Config(), ["model.n_layers=6", "optim.learning_rate=1e-4", "model.scan_layers=false",
                                     "data.sources=text:a.txt,jsonl:b.jsonl#text", "model.norm=layernorm",
                                     "mesh.fsdp=-1", "name=x", "train.steps=1_000"])
    assert cfg.model.n_layers == 6 and cfg.optim.learning_rate == 1e-4 and cfg.model.scan_layers is False
    assert cfg.data.sources == ("text:a.txt", "jsonl:b.jsonl#text")
    assert (cfg.model.norm, cfg.mesh.fsdp, cfg.name, cfg.train.steps) == ("layernorm", -1, "x", 1000)


def test_tuple_override_accepts_python_literal():
    cfg = apply_overrides(Config(), ["data.sources=('text:a.txt', 'text:b.txt')"])
    assert cfg.data.sources == ("text:a.txt", "text:b.txt")


def test_unknown_key_suggests_closest():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.n_layer'; did you mean model.n_layers\?"):
        apply_overrides(Config(), ["model.n_layer=3"])


def test_unknown_key_without_close_match():
    with pytest.raises(ConfigError, match="unknown config key 'zzz.qqq'$"):
        apply_overrides(Config(), ["zzz.qqq=3"])


@pytest.mark.parametrize("item, message", [
    ("model.n_layers=four", "cannot parse as int"),
    ("model.scan_layers=maybe", "expected true or false"),
    ("model.n_layers", "not of the form key=value"),
])
def test_bad_override_values(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), [item])


@pytest.mark.parametrize("item, message", [
    ("model.norm=batchnorm", "model.norm='batchnorm' is not one of rmsnorm, layernorm"),
    ("model.n_kv_heads=3", "multiple of model.n_kv_heads=3"),
    ("train.microbatches=3", "divisible by train.microbatches=3"),
    ("model.d_model=0", "model.d_model=0 must be positive"),
    ("data.eval_fraction=1.5", "strictly between 0 and 1"),
])
def test_validation_errors_name_the_key(item, message):
    with pytest.raises(ConfigError, match=message):
        validate(apply_overrides(Config(), [item]))


def test_two_fill_axes_rejected():
    with pytest.raises(ConfigError, match="at most one of mesh"):
        validate(apply_overrides(Config(), ["mesh.data=-1", "mesh.fsdp=-1"]))


def test_presets_differ_where_they_should():
    assert llama().norm == "rmsnorm" and llama().position == "rope" and not llama().tie_embeddings
    g = gpt2(d_model=64, n_heads=4)
    assert (g.norm, g.position, g.mlp, g.tie_embeddings, g.n_kv_heads, g.d_ff) == \
        ("layernorm", "learned", "gelu", True, 4, 256)


@pytest.mark.parametrize("path", sorted(EXPERIMENTS_DIR.glob("*.py")), ids=lambda p: p.stem)
def test_every_experiment_loads_and_validates(path):
    cfg = validate(load_experiment(str(path)))
    assert cfg.name == path.stem
    # Its sources are its task's kind (a fine-tuning experiment takes its model and tokenizer from init_from; an
    # RL one its reward from rl.reward_model).
    tasks.make(apply_overrides(cfg, ["data.tokenizer=tokenizer.model", "checkpoint.init_from=export",
                                     "rl.reward_model=count:1", "rl.value_init=policy"]))
    for key in ("train.steps", "train.eval_every", "model.n_layers", "model.d_model", "mesh.data", "mesh.fsdp",
                "mesh.tensor", "data.seq_len"):
        apply_overrides(cfg, [f"{key}=2"])  # the keys tools rely on exist under these names


def test_experiment_by_name_and_missing_file():
    assert load_experiment("pretrain_tiny").name == "pretrain_tiny"
    with pytest.raises(ConfigError, match="not found"):
        load_experiment("experiments/nope.py")


def test_dict_round_trip():
    cfg = apply_overrides(Config(), ["data.sources=text:a,text:b", "model.n_layers=3"])
    assert from_dict(to_dict(cfg)) == cfg
    assert dataclasses.asdict(from_dict(to_dict(cfg))) == to_dict(cfg)


def test_configs_saved_before_the_task_key_still_load():
    """Run directories and exports written when data.format and model.head chose the kind of run."""
    for fmt, head, task in (("text", "lm", "pretrain"), ("dialogue", "lm", "sft"), ("preference", "reward", "reward")):
        old = to_dict(Config())
        del old["task"]
        old["data"]["format"], old["model"]["head"] = fmt, head
        assert from_dict(old) == dataclasses.replace(Config(), task=task)
