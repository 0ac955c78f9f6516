"""Pipelines: the recipe's stages in order, each an experiment started from an earlier stage's export.

A pipeline file (conventionally under experiments/pipelines/) defines `pipeline() -> Pipeline`:

    Pipeline(stages=(
        Stage("pretrain", "pretrain_tiny"),
        Stage("sft", "sft_tiny", ("data.sources=oasst:sft_oasst1_en/*.jsonl.gz",), init_from="pretrain"),
        Stage("rm", "rm_tiny", init_from="sft"),
        Stage("ppo", "ppo_tiny", init_from="sft", reward_model="rm"),
        Stage("dpo", "dpo_tiny", init_from="sft", enabled=False),     # --set dpo.enabled=true
    ), card=Card(judge="rm", baseline="sft"))

Wiring: `init_from` sets checkpoint.init_from to that stage's export (its model, tokenizer and chat template
come with it), `reward_model` sets rl.reward_model to a reward-model stage's export, and `pairs_from` trains on
the preference pairs a Comparisons stage wrote (a second round: the new policy's answers against the old one's,
judged by the first reward model). `--set STAGE.KEY=VALUE` overrides one stage's config (`--set
sft.train.steps=50`) or its `enabled` switch; `--set card.FIELD=VALUE` the report card's settings.

A stage that `waits_for` a key the user must give (the Chinese pipeline's comparisons) is held, with every
stage wired to it, until `--set STAGE.KEY=VALUE` gives that key.

Every stage's config is built and validated before anything runs, with the config each earlier stage's export
will hold standing in for the export (the task's own checks of files run when the stage starts).
"""
from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path

from llm_jax import tasks
from llm_jax.config import Config, validate
from llm_jax.errors import ConfigError
from llm_jax.experiment import (EXPERIMENTS_DIR, apply_overrides, init_from_saved, load_definition,
                                load_experiment, parse_value, with_init_from)


@dataclass(frozen=True)
class Stage:
    name: str  # its run directory: PIPELINE_DIR/<name>, its export PIPELINE_DIR/<name>/export
    experiment: str  # experiment name or path, as `train --config` takes it
    overrides: tuple[str, ...] = ()
    init_from: str = ""  # an earlier stage: start from its export (checkpoint.init_from)
    reward_model: str = ""  # an earlier reward-model stage: RL scores its answers with its export
    pairs_from: str = ""  # an earlier Comparisons stage: train on its pairs (data.sources=pairs:FILE)
    data_from: str = ""  # an earlier stage: train on its data.sources (RL on the prompts of the RM's pairs)
    enabled: bool = True
    waits_for: str = ""  # a config key only the user can give (their data): the stage, and every stage wired
    # to it, is held until `--set NAME.<waits_for>=...` is given


@dataclass(frozen=True)
class Comparisons:
    """Trains nothing: `policy` and `baseline` (earlier stages) answer the training prompts of `prompts`, `judge`
    (a reward-model stage) scores both answers, and each prompt whose answers differ becomes a pair
    {prompt, chosen, rejected} in PIPELINE_DIR/<name>/pairs.jsonl for a later stage's `pairs_from`."""
    name: str
    policy: str
    baseline: str
    judge: str
    prompts: str  # prompt sources, kind:GLOB[,kind:GLOB]
    samples: int = 256
    max_tokens: int = 64
    enabled: bool = True


@dataclass(frozen=True)
class Card:
    """What the report card measures beyond each run's own results."""
    tasks: tuple[str, ...] = ("blimp", "piqa")  # in-context benchmarks for every language model stage
    shots: tuple[int, ...] = (0, 5)
    limit: int = 200  # items per benchmark
    prompts: tuple[str, ...] = ("What is a good way to learn a new language?", "Write a haiku about the sea.",
                                "Why is the sky blue?")  # every stage's answers to these, side by side
    max_tokens: int = 48
    judge: str = ""  # the reward-model stage that judges win rates ("" : none)
    baseline: str = ""  # the stage RL and DPO policies are compared with (usually SFT)
    compare_prompts: str = "hh:pref_hh_rlhf/*.jsonl.gz"  # held-out prompts for the win rates ("": the judge's data)
    compare_samples: int = 64


@dataclass(frozen=True)
class Pipeline:
    stages: tuple[Stage | Comparisons, ...]
    card: Card = Card()
    name: str = ""  # default: the pipeline file's stem


@dataclass(frozen=True)
class Planned:
    stage: Stage | Comparisons
    run_dir: Path
    cfg: Config | None  # the config its `train` resolves (None for Comparisons)
    overrides: tuple[str, ...]  # every --set its `train` gets, the wiring included

    @property
    def export(self) -> Path:
        return self.run_dir / "export"


def load_pipeline(path: str | Path) -> Pipeline:
    """`pipeline()` of a pipeline file, given as a path or as a name under experiments/pipelines/."""
    pipeline = load_definition(path, EXPERIMENTS_DIR / "pipelines", "pipeline", Pipeline, "pipeline")
    pipeline = pipeline if pipeline.name else dataclasses.replace(pipeline, name=Path(path).stem)
    check_names(pipeline)
    return pipeline


def check_names(pipeline: Pipeline) -> None:
    """Stage names are unique (enabled or not), and usable in `--set NAME.KEY=VALUE` and as directories."""
    seen = set()
    for stage in pipeline.stages:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", stage.name) or stage.name in seen or stage.name == "card":
            raise ConfigError(f"pipeline {pipeline.name!r}: stage name {stage.name!r} must be unique, of letters, "
                              "digits, _ and - (and not 'card')")
        seen.add(stage.name)


def with_overrides(pipeline: Pipeline, overrides: list[str]) -> Pipeline:
    """The pipeline with `STAGE.KEY=VALUE` (a config key, or `enabled`) and `card.FIELD=VALUE` applied."""
    names = [s.name for s in pipeline.stages]
    stages, card = {s.name: s for s in pipeline.stages}, pipeline.card
    for item in overrides:
        target, _, rest = item.partition(".")
        key, eq, value = rest.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {item}: expected STAGE.KEY=VALUE (stages: {', '.join(names)}) or "
                              "card.FIELD=VALUE")
        if target == "card":
            card = _replace_field(card, key.strip(), value.strip(), f"--set {item}")
        elif target not in stages:
            raise ConfigError(f"--set {item}: no stage {target!r} (stages: {', '.join(names)}; or card)")
        elif key.strip() == "enabled" or isinstance(stages[target], Comparisons):
            stages[target] = _replace_field(stages[target], key.strip(), value.strip(), f"--set {item}")
        else:
            stage = stages[target]
            stages[target] = dataclasses.replace(stage, overrides=(*stage.overrides, f"{key.strip()}={value.strip()}"),
                                                 waits_for="" if key.strip() == stage.waits_for else stage.waits_for)
    return dataclasses.replace(pipeline, stages=tuple(stages[n] for n in names), card=card)


def _replace_field(obj, key: str, text: str, where: str):
    hints = typing.get_type_hints(type(obj))
    if key not in hints or key == "name":
        raise ConfigError(f"{where}: {type(obj).__name__} has no settable field {key!r} "
                          f"(it has: {', '.join(n for n in hints if n != 'name')})")
    return dataclasses.replace(obj, **{key: parse_value(f"{getattr(obj, 'name', 'card')}.{key}", text, hints[key])})


def plan(pipeline: Pipeline, pipeline_dir: Path) -> tuple[list[Planned], dict[str, str]]:
    """(every enabled stage with its wiring, run directory and config, validated in order; {held stage: why})."""
    check_names(pipeline)
    planned: dict[str, Planned] = {}
    held: dict[str, str] = {}
    for stage in pipeline.stages:
        if not stage.enabled:
            continue
        inputs = [getattr(stage, k) for k in ("init_from", "reward_model", "pairs_from", "data_from", "policy",
                                              "baseline", "judge") if getattr(stage, k, "")]
        if getattr(stage, "waits_for", ""):
            held[stage.name] = f"waits for --set {stage.name}.{stage.waits_for}=..."
        elif waiting := [name for name in inputs if name in held]:
            held[stage.name] = f"waits for stage {waiting[0]}"
        else:
            planned[stage.name] = _plan_stage(pipeline, stage, planned, pipeline_dir)
    if not planned:
        raise ConfigError(f"pipeline {pipeline.name!r} has no enabled stage")
    card = pipeline.card
    for role, want in (("judge", "reward"), ("baseline", "lm")):
        name = getattr(card, role)
        if name and name not in held:
            _earlier(planned, name, f"pipeline {pipeline.name!r}: card.{role}", want=want)
    return list(planned.values()), held


def _plan_stage(pipeline: Pipeline, stage: Stage | Comparisons, planned: dict[str, Planned],
                pipeline_dir: Path) -> Planned:
    where = f"pipeline {pipeline.name!r}, stage {stage.name}"
    if isinstance(stage, Comparisons):
        for role in ("policy", "baseline", "judge"):
            _earlier(planned, getattr(stage, role), f"{where}: {role}", want="reward" if role == "judge" else "lm")
        return Planned(stage, pipeline_dir / stage.name, None, ())
    # What the user or the file sets explicitly wins over the wiring (their own export, their own labels).
    given = explicit_keys(stage)
    wiring = []
    if stage.init_from and "checkpoint.init_from" not in given:
        wiring.append(f"checkpoint.init_from={_earlier(planned, stage.init_from, f'{where}: init_from').export}")
    if stage.reward_model and "rl.reward_model" not in given:
        wiring.append(f"rl.reward_model={_earlier(planned, stage.reward_model, f'{where}: reward_model', 'reward').export}")
    if stage.data_from and "data.sources" not in given:
        source = _earlier(planned, stage.data_from, f"{where}: data_from", want=None)
        wiring.append(f"data.sources={','.join(source.cfg.data.sources)}")
    if stage.pairs_from and "data.sources" not in given:
        source = planned.get(stage.pairs_from)
        if source is None or not isinstance(source.stage, Comparisons):
            raise ConfigError(f"{where}: pairs_from={stage.pairs_from!r} is not an earlier, enabled Comparisons stage")
        wiring.append(f"data.sources=pairs:{(source.run_dir / 'pairs.jsonl').absolute()}")
    overrides = (*stage.overrides, *wiring)
    try:
        cfg = apply_overrides(load_experiment(stage.experiment), list(overrides))
        if stage.init_from and "checkpoint.init_from" not in given:  # the export that stage will write holds
            cfg = validate(init_from_saved(cfg, planned[stage.init_from].cfg, planned[stage.init_from].export))
        else:  # its config; an export the user named is read now
            cfg = validate(with_init_from(cfg))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return Planned(stage, pipeline_dir / stage.name, cfg, overrides)


def explicit_keys(stage: Stage | Comparisons) -> set[str]:
    """The config keys a stage's overrides set explicitly: they win over its wiring."""
    return {o.split("=", 1)[0].strip() for o in getattr(stage, "overrides", ())}


def describe(item: Planned) -> str:
    """A stage in a few words: its experiment and task, and the wiring in force."""
    s = item.stage
    if isinstance(s, Comparisons):
        return f"comparisons: {s.policy} vs {s.baseline}, judged by {s.judge}"
    given = explicit_keys(s)
    wiring = [f"{k} {v}" for k, v, key in (("from", s.init_from, "checkpoint.init_from"),
                                           ("reward model", s.reward_model, "rl.reward_model"),
                                           ("pairs", s.pairs_from, "data.sources"),
                                           ("data of", s.data_from, "data.sources")) if v and key not in given]
    return ", ".join([f"{s.experiment} (task {item.cfg.task})", *wiring])


def head(item: Planned) -> str:
    """"lm" or "reward": what the stage's export is."""
    return tasks.TASKS[item.cfg.task].head if item.cfg is not None else "pairs"


def _earlier(planned: dict[str, Planned], name: str, where: str, want: str | None = "lm") -> Planned:
    """The planned stage `name`, which must come earlier and train a model with the `want` head (None: any)."""
    source = planned.get(name)
    if source is None or source.cfg is None:
        raise ConfigError(f"{where}={name!r} is not an earlier, enabled training stage")
    if want is not None and head(source) != want:
        raise ConfigError(f"{where}={name!r} is a task={source.cfg.task} stage, not a "
                          f"{'reward model' if want == 'reward' else 'language model'}")
    return source
