"""`llm-jax sample --trace`: the model's probabilities at each step, equal to the full forward pass's; the trace
leaves sampling as it is; the plain lines and the JSON document of the CLI."""
import io
import json
import re

import jax
import numpy as np
import pytest

from llm_jax.cli.main import main
from llm_jax.inference.generate import Generator, Sampling
from llm_jax.inference.runner import ModelRunner
from llm_jax.inference.stream import sample
from llm_jax.inference.trace import trace_sample
from llm_jax.model import Transformer
from test_evaluate import random_export

PROMPT = "the cat sees"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny random model's export: (directory, config, params, tokenizer)."""
    return random_export(tmp_path_factory, seed=5)


@pytest.fixture(scope="module")
def greedy(export):
    """A greedy Generator with a trace of 5 alternatives, compiled once for the tests that share it."""
    _, cfg, params, _ = export
    return Generator(ModelRunner(cfg.model, params), Sampling(temperature=0), trace=5)


def test_greedy_trace_probabilities_are_the_full_forward_pass_softmax(export, greedy):
    _, cfg, params, tok = export
    doc = trace_sample(greedy, tok, PROMPT, 6, seed=0, as_json=True, out=io.StringIO())
    ids = [*doc["prompt_ids"], *[s["id"] for s in doc["steps"]]]
    assert doc["prompt_ids"] == tok.encode_prompt(PROMPT) and len(doc["steps"]) == 6  # no stop token comes (checked)
    tokens = np.asarray(ids, np.int32)[None]
    logits = jax.jit(Transformer(cfg.model).apply)({"params": params}, tokens, np.arange(len(ids))[None],
                                                   np.ones_like(tokens))
    probs = np.asarray(jax.nn.softmax(np.asarray(logits, np.float64)[0], axis=-1))
    for step in doc["steps"]:
        expected = probs[len(doc["prompt_ids"]) + step["step"] - 2]  # the position that predicts this step's token
        top = np.argsort(-expected)[:5]
        assert [t["id"] for t in step["top"]] == top.tolist()
        np.testing.assert_allclose([t["prob"] for t in step["top"]], expected[top], atol=1e-5)
        assert step["id"] == step["top"][0]["id"] == expected.argmax()  # greedy picks the most probable
        np.testing.assert_allclose([step["prob"], np.exp(step["logprob"])], expected.max(), atol=1e-5)
        assert step["text"] == tok.decode([step["id"]])
    assert doc["text"] == tok.decode([s["id"] for s in doc["steps"]])


def test_a_stop_token_is_the_last_step_and_left_out_of_the_text(export, greedy, monkeypatch):
    tok = export[3]
    free = [s["id"] for s in trace_sample(greedy, tok, PROMPT, 6, seed=0, out=io.StringIO())["steps"]]
    stop = free[2]
    monkeypatch.setattr("llm_jax.inference.trace.stop_ids", lambda tokenizer: {stop})
    out = io.StringIO()
    doc = trace_sample(greedy, tok, PROMPT, 6, seed=0, out=out)
    first = free.index(stop)
    assert [s["id"] for s in doc["steps"]] == free[:first + 1] and doc["text"] == tok.decode(free[:first])
    lines = out.getvalue().splitlines()
    assert len(lines) == first + 3 and lines[-2].endswith("(stop)") and lines[-1] == f"text {doc['text']!r}"


@pytest.mark.slow
def test_the_trace_leaves_sampling_as_it_is(export):
    _, cfg, params, tok = export
    sampling = Sampling(temperature=1.3, top_k=40, top_p=0.9)
    plain = sample(Generator(ModelRunner(cfg.model, params), sampling), tok, PROMPT, 8, seed=7, out=io.StringIO())
    traced = Generator(ModelRunner(cfg.model, params), sampling, trace=3)
    doc = trace_sample(traced, tok, PROMPT, 8, seed=7, out=io.StringIO())
    assert [s["id"] for s in doc["steps"]] == plain
    assert all(len(s["top"]) == 3 and s["prob"] <= s["top"][0]["prob"] + 1e-6 for s in doc["steps"])
    assert any(s["id"] != s["top"][0]["id"] for s in doc["steps"])  # sampled, not greedy: the test tests something
    assert traced._step._cache_size() == 1


@pytest.mark.slow
def test_sample_cli_traces_in_lines_and_in_json(export, capsys):
    argv = ["sample", "--checkpoint", str(export[0]), "--prompt", PROMPT, "--trace", "--max-tokens", "5",
            "--temperature", "0"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 5 and lines[0] == f"prompt {PROMPT!r} ({len(export[3].encode_prompt(PROMPT))} tokens)"
    assert all(re.fullmatch(rf"step {i}  id +\d+  .+  p=\d\.\d{{3}}   top: .+( \| .+){{4}}", line)
               for i, line in enumerate(steps, 1)), steps
    assert main([*argv, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == {"prompt", "prompt_ids", "steps", "text"} and doc["prompt"] == PROMPT
    assert [s["step"] for s in doc["steps"]] == [1, 2, 3, 4, 5]
    assert all(set(s) == {"step", "id", "text", "prob", "logprob", "top"} and len(s["top"]) == 5 and
               set(s["top"][0]) == {"id", "text", "prob"} for s in doc["steps"])
    # The plain lines show the same tokens.
    assert [int(line.split()[3]) for line in steps] == [s["id"] for s in doc["steps"]]


@pytest.mark.parametrize("flags, message", [(["--json"], "--json: only with --trace"),
                                            (["--top", "3"], "--top: only with --trace"),
                                            (["--trace", "--top", "0"], "--top=0: must be >= 1")])
def test_trace_flags_without_trace_are_one_line_errors(tmp_path, capsys, flags, message):
    assert main(["sample", "--checkpoint", str(tmp_path / "missing"), "--prompt", "x", *flags]) == 2
    assert capsys.readouterr().err == f"llm-jax: error: {message}\n"  # before the (missing) checkpoint is read
