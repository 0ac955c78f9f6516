"""What every test shares: 8 fake CPU devices, a compilation cache, the tiny corpus and the tiny run.

The environment is set before JAX is imported anywhere, and subprocesses (`python -m llm_jax ...`) and
pytest-xdist's workers inherit it. Tests marked `slow` spawn processes, or train or compile for more than
about 4 seconds on 2 cores: `pytest -m "not slow"` leaves them out.
"""
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The suite compiles hundreds of tiny programs and runs each a few times: XLA's least optimised code
# generation compiles them ~20% faster. Every comparison in the suite is between programs compiled alike.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite is mostly compilation, which one malloc arena slows by ~25% (many compile threads); it only makes
# steps faster. tests/test_runtime.py turns it on where it is tested.
os.environ.setdefault("LLM_JAX_MALLOC", "system")
# Many tests compile the same few programs (the tiny model's steps): a persistent compilation cache holds
# the same executables, so the same numbers, and saves most of the compile time. One per session: made by
# the process that starts pytest, and inherited by pytest-xdist's workers and the runs' subprocesses.
_CACHE = None if "JAX_COMPILATION_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="llm_jax_tests_jax_cache_")
if _CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The tiny model: every dimension divides by 2 (tensor parallelism) and fits a 320-piece tokenizer. Llama's MLP,
# whatever the experiment ships, so every export of it has a Hugging Face equivalent.
TINY_MODEL = ("model.vocab_size=320", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
              "model.n_kv_heads=2", "model.d_ff=64", "model.mlp=swiglu")
# The tiny pretraining run on `corpus`, beside TINY_MODEL: seconds on 2 cores, and the loss visibly falls.
TINY_RUN = ("data.seq_len=32", "train.batch_size=8", "train.steps=60", "train.eval_every=20", "train.log_every=5",
            "optim.warmup_steps=5", "optim.learning_rate=1e-2", "data.max_bytes=0", "train.eval_batches=0",
            "train.time_budget_s=0", "optim.optimizer=adamw")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: spawns processes, or trains or compiles for more than ~4 s on 2 cores")
    config.addinivalue_line("markers", "browser: drives the chat page in headless Chromium (Debian's chromium and "
                            "chromium-driver packages); skipped, saying so, where they are not installed")


def pytest_sessionfinish(session, exitstatus):
    if _CACHE:  # made by this process: pytest-xdist's workers use the controller's, which outlives them
        shutil.rmtree(_CACHE, ignore_errors=True)


def set_flags(items) -> list[str]:
    return [flag for item in items for flag in ("--set", item)]


def write_corpus(root: Path, n_files: int = 6, seed: int = 0) -> Path:
    """A small learnable language: sentences from a toy grammar, a little Chinese and code."""
    rng = random.Random(seed)
    nouns, verbs = ["cat", "dog", "bird", "fish", "mouse"], ["sees", "chases", "likes", "eats"]
    for i in range(n_files):
        lines = [f"the {rng.choice(nouns)} {rng.choice(verbs)} the {rng.choice(nouns)}." for _ in range(300)]
        lines += ["猫看见了狗。", "def f(x):\n    return x + 1\n"]
        (root / f"doc{i}.txt").write_text("\n".join(lines), encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The toy corpus, shared read-only by every test."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def tiny_overrides(corpus) -> tuple[str, ...]:
    """`--set` items of the tiny pretraining run on the toy corpus (later items override earlier ones)."""
    return (f"data.sources=text:{corpus}/*.txt", *TINY_MODEL, *TINY_RUN)


@pytest.fixture(scope="session")
def train_args(tiny_overrides):
    """train_args(run_dir, *overrides, config=..., flags=...): the argv of `llm-jax train` for the tiny run."""
    def make(run_dir, *extra: str, config: str = "pretrain_tiny", flags=()) -> list[str]:
        return ["train", "--config", config, "--run-dir", str(run_dir), *flags,
                *set_flags((*tiny_overrides, *extra))]
    return make


@pytest.fixture(scope="session")
def scalars():
    """scalars(run_dir) -> ({tag: [(step, value), ...]}, the EventAccumulator) of a run's TensorBoard files;
    with every_point=True, points a later one of the same step would hide are kept too, in file order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def read(run_dir, every_point: bool = False):
        acc = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"scalars": 0, "tensors": 0},
                               purge_orphaned_data=not every_point)
        acc.Reload()
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}, acc
    return read


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory, train_args) -> Path:
    """An `llm-jax export` of the tiny run trained 20 steps: the start of SFT, reward and generation tests."""
    from llm_jax.cli.main import main
    root = tmp_path_factory.mktemp("tiny_export")
    assert main(train_args(root / "run", "train.steps=20", "train.eval_every=1000")) == 0
    assert main(["export", "--run-dir", str(root / "run"), "--out", str(root / "export")]) == 0
    return root / "export"
