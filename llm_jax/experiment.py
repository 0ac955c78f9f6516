"""The config a command runs with: an experiment file, `--set a.b=v` overrides, and the export a
fine-tuning run starts from (checkpoint.init_from), validated.

An experiment is a Python file under `experiments/` defining `config() -> Config`, usually a short
`dataclasses.replace` diff from the defaults in config.py. Every field can be overridden from the command
line (`--set model.n_layers=4`); unknown keys are errors that name the closest existing key.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import typing
from pathlib import Path

from llm_jax.config import REPO_ROOT, RUN_FIELDS, Config, from_dict, validate
from llm_jax.errors import ConfigError

EXPERIMENTS_DIR = REPO_ROOT / "experiments"


def load_experiment(path_or_name: str) -> Config:
    """`config()` of an experiment file, given as a path or as a name under experiments/."""
    return load_definition(path_or_name, EXPERIMENTS_DIR, "config", Config, "experiment")


def load_definition(path_or_name: str | Path, folder: Path, function: str, kind: type, what: str):
    """`function()` of a Python file (a path, or a name under `folder`), which must return a `kind`: experiment
    files' config(), sweep files' sweep(), pipeline files' pipeline()."""
    path = Path(path_or_name)
    if not path.suffix:
        path = folder / f"{path}.py"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
        raise ConfigError(f"{what} file {str(path)!r} not found (known: {', '.join(known)})")
    spec = importlib.util.spec_from_file_location(f"llm_jax_{what}_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    value = getattr(module, function)() if hasattr(module, function) else None
    if not isinstance(value, kind):
        raise ConfigError(f"{what} file {str(path)!r} must define {function}() returning "
                          f"{kind.__module__}.{kind.__name__}")
    return value


def flat_keys(cfg: Config) -> dict[str, type]:
    """Every overridable dotted key with its annotated type."""
    keys = {}
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value):
            hints = typing.get_type_hints(type(value))
            for f in dataclasses.fields(value):
                keys[f"{section.name}.{f.name}"] = hints[f.name]
        else:
            keys[section.name] = typing.get_type_hints(type(cfg))[section.name]
    return keys


def parse_value(key: str, text: str, typ):
    """`text` as a value of type `typ` (bool, int, float, str or a tuple of them); errors name `key`."""
    try:
        if typ is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError("expected true or false")
        if typ is int:
            return int(text.replace("_", ""))
        if typ is float:
            return float(text)
        if typ is str:
            return text
        if typing.get_origin(typ) is tuple:
            if text.startswith(("(", "[")):
                items = ast.literal_eval(text)
            else:
                items = [t for t in text.split(",") if t]
            item_type = (typing.get_args(typ) or (str,))[0]
            return tuple(item_type(i) for i in items)
    except (ValueError, SyntaxError, TypeError) as e:  # TypeError: "(5)" is an int, not a sequence
        raise ConfigError(f"--set {key}={text}: cannot parse as {getattr(typ, '__name__', typ)} ({e})") from None
    raise ConfigError(f"--set {key}: unsupported field type {typ}")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    keys = flat_keys(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. model.n_layers=4)")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in keys:
            close = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        value = parse_value(key, text.strip(), keys[key])
        if "." in key:
            section, name = key.split(".", 1)
            cfg = dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: value})})
        else:
            cfg = dataclasses.replace(cfg, **{key: value})
    return cfg


def with_init_from(cfg: Config) -> Config:
    """Fine-tuning an export: its model (with this config's RUN_FIELDS) and its tokenizer are the ones to
    train, and its chat template unless this config names one. Applying it twice changes nothing."""
    if not cfg.checkpoint.init_from:
        return cfg
    export = Path(cfg.checkpoint.init_from)
    if not (export / "config.json").is_file():
        raise ConfigError(f"checkpoint.init_from={export}: not an export directory (no config.json); "
                          "make one with `llm-jax export`")
    return init_from_saved(cfg, from_dict(json.loads((export / "config.json").read_text())), export)


def init_from_saved(cfg: Config, saved: Config, export: Path) -> Config:
    """with_init_from for an export at `export` whose config is `saved` (a pipeline plans with the config an
    earlier stage's export will hold, before it exists)."""
    own = {f: getattr(cfg.model, f) for f in RUN_FIELDS}
    return dataclasses.replace(cfg, model=dataclasses.replace(saved.model, **own),
                               data=dataclasses.replace(cfg.data, tokenizer=str(export / "tokenizer.model"),
                                                        chat_template=cfg.data.chat_template
                                                        or saved.data.chat_template))


def resolve(cfg: Config) -> Config:
    """The config a run trains with: init_from applied, every field validated."""
    return validate(with_init_from(cfg))


def from_command_line(experiment: str, overrides: list[str]) -> Config:
    """An experiment file with its `--set` overrides, resolved."""
    return resolve(apply_overrides(load_experiment(experiment), overrides))
