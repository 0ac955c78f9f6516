"""Orbax checkpoints of a run: the train state, the batch source's position and a JSON of metadata.

`RUN_DIR/checkpoints/<step>/` holds three items: `state` (params, optimizer state, step, RNG, skipped-step
count; restored straight into the current mesh's shardings, so a checkpoint written on one mesh resumes on
another), `data` (each process's batch source position: a grain iterator's, for data sets) and `meta` (the
resolved config, the tokenizer model, the last evaluation's scores and the run's time so far:
train/budget.Clock). Orbax writes a step under a temporary name and renames it when
complete, so a killed save never looks like a checkpoint; a committed one that cannot be read is moved to
`RUN_DIR/corrupt_checkpoints/` (never deleted) and the previous step is used instead.

Data order across a change in the number of processes: global batch s is always windows [s·G, (s+1)·G) of one
seeded, shuffled stream (see data/pipeline.py), whatever the number of processes. When the per-process
positions do not fit the new process layout, each process restarts its source at batch s, so the global data
order is unchanged.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import gc
import logging
import os
import shutil
import sys
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from llm_jax.config import RUN_FIELDS, CheckpointConfig, Config, from_dict, to_dict
from llm_jax.data.tokenizer import from_bytes
from llm_jax.errors import CheckpointError
from llm_jax.train import peft


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def manager(run_dir: Path, cfg: CheckpointConfig, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else cfg.keep, keep_period=cfg.keep_period or None,
        save_interval_steps=0 if read_only else 1, create=not read_only, read_only=read_only,
        # A save killed half-way leaves a temporary directory, never a checkpoint: the next run removes it.
        cleanup_tmp_directories=not read_only, enable_async_checkpointing=cfg.async_save)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(checkpoint_dir(run_dir).absolute(), options=options, item_handlers=handlers)


def meta(cfg: Config, tokenizer_path: Path) -> dict:
    """The config, the tokenizer and, for a peft run, the fingerprint of the base its adapters belong to."""
    base = {"peft_base": peft.fingerprint(Path(cfg.checkpoint.init_from))} if peft.enabled(cfg) else {}
    return {"config": to_dict(cfg), "process_count": jax.process_count(), **base,
            "tokenizer_model": base64.b64encode(Path(tokenizer_path).read_bytes()).decode("ascii")}


def save(mngr: ocp.CheckpointManager, state, source, meta_json: dict) -> None:
    """Starts a save of `state` at its step, with the batch source's position; returns once the arrays are
    copied off the devices."""
    step = int(jax.device_get(state.step))
    mngr.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(source),
        meta=ocp.args.JsonSave(meta_json)))


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


@contextlib.contextmanager
def _quiet():
    """Orbax, asyncio and TensorStore's threads print a traceback per damaged array, through logging and
    straight to file descriptor 2; the caller reports the failure in one line instead."""
    sys.stderr.flush()
    saved_fd = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        gc.collect()  # abandoned futures complain when collected: let them do it while silenced
        logging.disable(logging.NOTSET)
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
        os.close(devnull)


def committed_steps(run_dir: Path) -> list[int]:
    """Steps whose checkpoint was committed (orbax renames a step directory into place when complete)."""
    root = checkpoint_dir(run_dir)
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def restore_latest(run_dir: Path, cfg: Config, target_state, tokenizer) -> tuple[object, int, dict] | None:
    """(state, step, metadata) of the newest readable checkpoint, the state resharded like `target_state`;
    unreadable ones are moved aside.

    Its metadata is checked against this run first, so that a changed config is reported as such and
    never mistaken for a damaged checkpoint.
    """
    while steps := committed_steps(run_dir):
        step = steps[-1]
        mngr = manager(run_dir, cfg.checkpoint, read_only=True)
        try:
            with _quiet():
                saved = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            check_compatible(saved, cfg, tokenizer)
            with _quiet():
                state = _restore_state(mngr, step, target_state)
            return state, step, saved
        except CheckpointError:
            raise
        except Exception as e:  # orbax raises many kinds for a damaged checkpoint; all mean "unusable"
            _quarantine(run_dir, step, e)
        finally:
            mngr.close()
    return None


# Train-state fields that checkpoints of earlier versions do not have (restored at their initial values).
NEWER_STATE_FIELDS = {"planned_steps"}


def _restore_state(mngr: ocp.CheckpointManager, step: int, target_state):
    """The train state of checkpoint `step`. A checkpoint written before a field joined the train state
    (planned_steps) restores the fields it has; the new one keeps its value in `target_state`, its start."""
    saved_fields = set(mngr.item_metadata(step)["state"].keys())
    missing = {f.name for f in dataclasses.fields(target_state)} - saved_fields
    if missing - NEWER_STATE_FIELDS:  # not an older version's checkpoint but a damaged one: moved aside
        raise ValueError(f"the saved train state lacks {', '.join(sorted(missing))}")
    kept = {f.name: getattr(target_state, f.name) for f in dataclasses.fields(target_state) if f.name in saved_fields}
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(kept))))["state"]
    return target_state.replace(**restored)


def _quarantine(run_dir: Path, step: int, error: Exception) -> None:
    corrupt = Path(run_dir) / "corrupt_checkpoints"
    corrupt.mkdir(exist_ok=True)
    dest = corrupt / str(step)
    n = 1
    while dest.exists():
        dest, n = corrupt / f"{step}.{n}", n + 1
    if jax.process_index() == 0:
        shutil.move(str(checkpoint_dir(run_dir) / str(step)), dest)
    reason = " ".join(str(error).split())[:160]
    print(f"llm-jax: checkpoint step {step} is unreadable ({type(error).__name__}: {reason}); moved to {dest}, "
          f"trying the previous one", file=sys.stderr, flush=True)


def restore_params(run_dir: Path, step: int, target_params):
    """Only the params of checkpoint `step`, laid out like `target_params` (abstract arrays with shardings):
    inference and exports never read the optimizer's moments (with Adam, twice the size of the params)."""
    target = {"params": target_params}
    with ocp.PyTreeCheckpointer() as ckpt:
        restored = ckpt.restore((checkpoint_dir(run_dir) / str(step) / "state").absolute(), args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    return restored["params"]


def restore_data(run_dir: Path, cfg: Config, step: int, source) -> str:
    """Puts the batch source where it was at `step`: its saved state if it fits this process layout, else
    the start of global batch `step` (same global order). Returns which one was used."""
    # What grain's handler writes for each process of the layout that saved it.
    layout = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    saved = checkpoint_dir(run_dir) / str(step) / "data" / layout
    if not saved.is_file():
        source.restart_at(step)
        return f"batch {step} of the global order (process layout changed)"
    mngr = manager(run_dir, cfg.checkpoint, read_only=True)
    try:
        mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(source)))
    finally:
        mngr.close()
    return "saved position"


def check_compatible(saved: dict, cfg: Config, tokenizer) -> None:
    """The task, the model (but RUN_FIELDS) and the adapters must match field for field (the rest may change:
    train.steps, to train longer); the tokenizer and a peft run's base must be the ones the checkpoint was
    trained with."""
    diffs = differences(from_dict(saved["config"]), cfg, keys=("task", "model.", "peft."), ignore=RUN_KEYS)
    if diffs:
        raise CheckpointError(f"the checkpoint was written by a different task or model ({'; '.join(diffs)}); "
                              "use the same task and model.* settings, or --fresh to start over")
    saved_tok = base64.b64decode(saved["tokenizer_model"])
    if saved_tok != tokenizer.serialized():
        old = from_bytes(saved_tok)
        raise CheckpointError(f"the tokenizer differs from the checkpoint's (vocab size {tokenizer.vocab_size} now, "
                              f"{old.vocab_size} in the checkpoint); resume with the original data settings")
    peft.check_base(saved, cfg, "the checkpoint")


def estimated_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def check_writable(run_dir: Path, state_bytes: int, keep: int) -> None:
    """Fails before training when checkpoints could not be written: unwritable or nearly full disk."""
    try:
        checkpoint_dir(run_dir).mkdir(parents=True, exist_ok=True)
        probe = checkpoint_dir(run_dir) / ".write_probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoints under {run_dir}: {e.strerror or e}") from None
    free = shutil.disk_usage(checkpoint_dir(run_dir)).free
    # Orbax holds the new checkpoint beside the old ones until it commits.
    need = state_bytes * (keep + 1)
    if free < need:
        raise CheckpointError(f"not enough free space for checkpoints in {run_dir}: about {need / 2**20:.0f} MiB "
                              f"needed (checkpoint.keep={keep}), {free / 2**20:.0f} MiB free")


# The dotted keys of config.RUN_FIELDS: what a resumed run or a run from an export may set anew.
RUN_KEYS = tuple(f"model.{f}" for f in RUN_FIELDS)


def differences(saved: Config, cfg: Config, keys: tuple[str, ...] = (), ignore: tuple[str, ...] = ()) -> list[str]:
    """"key: old saved, new now" per differing dotted key (starting with one of `keys`, not in `ignore`)."""
    def flat(c: Config) -> dict:
        return {f"{section}.{k}" if isinstance(v, dict) else section: x
                for section, v in to_dict(c).items() for k, x in (v.items() if isinstance(v, dict) else [(None, v)])}
    old, new = flat(saved), flat(cfg)
    return [f"{key}: {old[key]!r} saved, {new[key]!r} now" for key in new
            if old.get(key) != new[key] and key not in ignore and (not keys or key.startswith(keys))]
