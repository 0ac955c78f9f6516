"""`llm-jax serve`: the OpenAI API through the official `openai` client, against a tiny model served in a
background process on 127.0.0.1; errors in the API's format; continuous batching against solo runs."""
import concurrent.futures
import dataclasses
import http.client
import json
import time
import urllib.error
import urllib.request
from urllib.parse import urlparse

import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest
from flax import linen as nn

from llm_jax.data.chat.dialogue import Message
from llm_jax.data.chat.template import render_prompt, stop_ids
from llm_jax.inference.generate import Generator, Sampling
from llm_jax.inference.runner import ModelRunner
from llm_jax.model import Transformer
from llm_jax.inference.stream import Detokenizer
from served import serving
from test_evaluate import random_export, tiny_config, write_export

pytestmark = pytest.mark.slow  # spawns a server process
KEY = "test-key"
PROMPTS = ["the dog", "the fish likes", "a", "the dog likes the fish and", "fish", "dog dog dog the"]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return random_export(tmp_path_factory)


@pytest.fixture(scope="module")
def server(export):
    # A context far past the 64 tokens trained (RoPE decodes on): room for a stream long enough to be cut off.
    with serving(export[0], "--max-batch", "8", "--max-context", "256", "--api-key", KEY, "--name", "tiny") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def post(url: str, path: str, body, key: str | None = KEY, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + path, data, headers), timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def greedy(client, prompt: str, max_tokens: int, **kw):
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, **kw)


def test_completions_match_the_generator_and_count_tokens(client, export):
    _, cfg, _, tok = export
    _, runner, _ = ModelRunner.load(export[0])
    stops = sorted(stop_ids(tok, cfg.data.chat_template))
    generator = Generator(runner, Sampling(temperature=0.0))
    for prompt in PROMPTS[:3]:
        ids = tok.encode_prompt(prompt)
        expected = generator.generate([ids], 12, stop_ids=stops, prompt_width=16)[0]  # one compilation
        text = Detokenizer(tok, set(stops), ())
        want = "".join(text.add(t) for t in expected) + text.add(None)
        got = greedy(client, prompt, 12)
        assert got.choices[0].text == want
        assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == len(expected)
        assert got.choices[0].finish_reason == ("stop" if expected[-1] in stops else "length")


def test_streamed_text_equals_whole_text_for_completions_and_chat(client, export):
    _, cfg, _, tok = export
    whole = greedy(client, "the dog", 20)
    streamed = list(greedy(client, "the dog", 20, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
    assert streamed[-1].usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the dog?"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0)
    parts = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                                stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == chat.choices[0].finish_reason
    rendered = render_prompt([Message("system", "Be brief."), Message("user", "the dog?")], tok,
                             cfg.data.chat_template)
    assert chat.usage.prompt_tokens == len(rendered)


def test_seeded_sampling_repeats_and_n_choices_differ(client):
    def sample(seed, n=1):
        return client.completions.create(model="tiny", prompt="the fish", max_tokens=16, temperature=1.0, top_p=0.95,
                                         seed=seed, n=n, extra_body={"top_k": 50})
    a, b, c = sample(7), sample(7), sample(8)
    assert a.choices[0].text == b.choices[0].text != c.choices[0].text
    two = sample(7, n=2)
    assert len(two.choices) == 2 and two.choices[0].text == a.choices[0].text != two.choices[1].text


def test_a_stop_string_cuts_the_text_before_it(client):
    full = greedy(client, "the dog", 24).choices[0].text
    stop = full[5:7]
    cut = greedy(client, "the dog", 24, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in greedy(client, "the dog", 24, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


@pytest.mark.parametrize("body, status, param, code", [
    ({"model": "gpt-4", "prompt": "x"}, 404, "model", "model_not_found"),
    ({"prompt": "x"}, 400, "model", None),
    ({"model": "tiny", "prompt": "the dog " * 400}, 400, "prompt", "context_length_exceeded"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 256}, 400, "max_tokens", "context_length_exceeded"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", None),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature", None),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, 400, "temperature", None),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p", None),
    ({"model": "tiny", "prompt": "x", "n": 99}, 400, "n", None),
    ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
    ({"model": "tiny", "prompt": "x", "logprobs": 5}, 400, "logprobs", "unsupported_parameter"),
    ({"model": "tiny", "prompt": "x", "temprature": 0}, 400, "temprature", "unrecognized_argument"),
    ({"model": "tiny", "prompt": 42}, 400, "prompt", None),
    ([1, 2], 400, None, None),
])
def test_completion_errors_are_openai_errors(server, body, status, param, code):
    got, reply = post(server, "/v1/completions", body)
    assert got == status and set(reply["error"]) == {"message", "type", "param", "code"}, reply
    assert (reply["error"]["param"], reply["error"]["code"]) == (param, code) and reply["error"]["message"]


@pytest.mark.parametrize("messages, param", [
    ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": 3}], "messages[0].content"),
    ([{"role": "assistant", "content": "hi"}], "messages"),
    ([], "messages"),
])
def test_chat_errors_name_the_message(server, messages, param):
    got, reply = post(server, "/v1/chat/completions", {"model": "tiny", "messages": messages})
    assert got == 400 and reply["error"]["param"] == param, reply


@pytest.mark.parametrize("extra, param", [({"max_completion_tokens": 300}, "max_completion_tokens"),
                                           ({"stream": True, "stream_options": {"include_usage": 1}},
                                            "stream_options.include_usage"),
                                           ({"stream_options": {"include_usage": True}}, "stream_options")])
def test_chat_setting_errors_name_the_field_as_sent(server, extra, param):
    got, reply = post(server, "/v1/chat/completions",
                      {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], **extra})
    assert got == 400 and reply["error"]["param"] == param, reply


def test_keys_json_routes_and_size_are_checked(server):
    ok = {"model": "tiny", "prompt": "x", "max_tokens": 1}
    assert post(server, "/v1/completions", ok, key="wrong")[0] == 401
    status, reply = post(server, "/v1/completions", ok, key=None)
    assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    status, reply = post(server, "/v1/completions", None, raw=b'{"model": "tiny", "prompt": ')
    assert status == 400 and "not valid JSON" in reply["error"]["message"]
    status, reply = post(server, "/v1/completions", None, raw=b"x" * (5 << 20))
    assert status == 413
    assert post(server, "/v1/nothing", ok)[0] == 404
    with urllib.request.urlopen(server + "/health", timeout=30) as r:  # open without a key
        assert json.loads(r.read())["status"] == "ok"
    assert post(server, "/v1/score", {"model": "tiny", "input": [{"prompt": "a", "response": "b"}]})[0] == 400
    with urllib.request.urlopen(urllib.request.Request(server + "/v1/models",
                                                       headers={"Authorization": f"Bearer {KEY}"})) as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == ["tiny"]


def stream_text(client, prompt: str, max_tokens: int) -> str:
    return "".join(c.choices[0].text for c in greedy(client, prompt, max_tokens, stream=True))


def test_32_concurrent_streams_equal_their_solo_outputs_and_a_disconnect_frees_its_slot(client, server):
    jobs = [(PROMPTS[i % len(PROMPTS)] + " " * (i % 3), 4 + (i * 7) % 29) for i in range(32)]
    solo = [greedy(client, p, m).choices[0].text for p, m in jobs]

    # One client starts a stream of 250 tokens, reads its first event, and hangs up while the 32 run.
    netloc = urlparse(server).netloc
    quitter = http.client.HTTPConnection(netloc, timeout=60)
    quitter.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "the", "max_tokens": 250,
                                                           "temperature": 0, "stream": True}),
                    {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = quitter.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    cancelled = health(server)["ended"].get("cancelled", 0)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(stream_text, client, p, m) for p, m in jobs]
        quitter.close()
        together = [f.result(timeout=300) for f in futures]
    assert together == solo
    deadline = time.monotonic() + 30
    while (state := health(server))["active"] + state["queued"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state["active"] == 0 and state["queued"] == 0, state
    assert state["ended"]["cancelled"] == cancelled + 1, state  # the quitter's slot, freed before its 250 tokens


def health(server: str) -> dict:
    with urllib.request.urlopen(server + "/health", timeout=30) as r:
        return json.loads(r.read())


def test_a_reward_model_serves_scores_and_refuses_generation(tmp_path_factory):
    cfg = dataclasses.replace(tiny_config(), task="reward")
    dummy = jnp.ones((1, 4), jnp.int32)
    params = nn.unbox(Transformer(cfg.model, head="reward").init(jax.random.key(0), dummy, dummy, dummy))["params"]
    out = write_export(tmp_path_factory.mktemp("rm"), cfg, params)
    records = [{"prompt": "the dog?", "response": "the fish."},
               {"prompt": "the dog?", "chosen": "the fish.", "rejected": "a dog."},
               {"prompt": "x", "chosen": "same", "rejected": "same"}]
    with serving(out, "--name", "rm") as url:
        status, reply = post(url, "/v1/score", {"model": "rm", "input": records}, key=None)
        assert status == 200, reply
        data = reply["data"]
        assert [d["index"] for d in data] == [0, 1, 2] and np.isfinite(data[0]["reward"])
        assert data[1]["preferred"] in ("chosen", "rejected", "tie") and data[2]["skipped"] == "identical answers"
        assert reply["summary"]["responses"] == 1 and reply["summary"]["pairs"] == 1
        status, reply = post(url, "/v1/score", {"model": "rm", "input": [{"prompt": "x"}]}, key=None)
        assert status == 400 and "input[0]" in reply["error"]["message"]
        status, reply = post(url, "/v1/completions", {"model": "rm", "prompt": "x"}, key=None)
        assert status == 400 and reply["error"]["code"] == "wrong_model_kind"
