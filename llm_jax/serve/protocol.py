"""The OpenAI API's requests and responses, without HTTP: validation of a completions or chat request into a
Generation (every bad field is an APIError naming it, in the API's own error format), and the JSON of the
answers, whole or as stream chunks.

Follows the OpenAI reference as vLLM serves it: `top_k` is an extension; fields the API defines but this server
does not implement (logprobs, tools, penalties...) are refused by name when they ask for something, accepted
when they are at their neutral value; any other field is refused ("Unrecognized request argument"), as the
OpenAI API does, so that a typo never passes silently.
"""
from __future__ import annotations

import dataclasses
import math
import secrets
import time

from llm_jax.data.chat.dialogue import Message, dialogue_problem
from llm_jax.data.chat.template import render_prompt
from llm_jax.errors import ConfigError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4  # stop strings per request, as the OpenAI API allows
MAX_N = 16
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream", "stream_options"}
IGNORED = {"user", "metadata", "store", "service_tier"}
NEUTRAL = {"presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None), "logit_bias": ({}, None),
           "logprobs": (False, None), "echo": (False, None), "best_of": (1, None), "suffix": (None, ""),
           "top_logprobs": (0, None), "parallel_tool_calls": (None, False, True), "tools": ([], None),
           "tool_choice": (None, "none")}
FIELDS = {"completions": COMMON | {"prompt"}, "chat": COMMON | {"messages", "max_completion_tokens"}}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What validation needs of the served model."""
    name: str
    tokenizer: object
    template: str  # the chat template
    context: int  # prompt + answer tokens, at most
    vocab_size: int
    max_n: int = MAX_N


@dataclasses.dataclass(frozen=True)
class Generation:
    kind: str  # "completions" | "chat"
    prompts: tuple[tuple[int, ...], ...]
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


def parse(kind: str, body, model: ModelInfo) -> Generation:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for key, value in body.items():
        if key in FIELDS[kind] or key in IGNORED:
            continue
        if key in NEUTRAL:
            if any(value == neutral and type(value) is type(neutral) for neutral in NEUTRAL[key]):
                continue
            raise APIError(400, f"{key}={value!r} is not supported by this server", key, "unsupported_parameter")
        raise APIError(400, f"Unrecognized request argument supplied: {key}", key, "unrecognized_argument")
    check_model(body, model)
    prompts = _chat_prompt(body, model) if kind == "chat" else _completion_prompts(body, model)
    longest = max(len(p) for p in prompts)
    which = "messages" if kind == "chat" else "prompt"
    if longest >= model.context:
        raise APIError(400, f"This model's maximum context length is {model.context} tokens, and the {which} "
                       f"alone has {longest}", which, "context_length_exceeded")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    # A completion defaults to 16 tokens as in the OpenAI API; a chat answer may use the rest of the context.
    max_tokens = _int(body, key, 16 if kind == "completions" else model.context - longest, 1, None)
    if max_tokens > model.context - longest:
        raise APIError(400, f"This model's maximum context length is {model.context} tokens; you requested "
                       f"{longest + max_tokens} ({longest} in the {which}, {max_tokens} in the completion)",
                       key, "context_length_exceeded")
    options = body.get("stream_options")
    stream = _typed(body, "stream", bool, False)
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise APIError(400, "stream_options is {\"include_usage\": bool}, and only with stream=true",
                       "stream_options")
    return Generation(
        kind, prompts, max_tokens, n=_int(body, "n", 1, 1, model.max_n),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=_number(body, "top_p", 1.0, 0.0, 1.0,
                                                                                open_low=True),
        top_k=_int(body, "top_k", 0, 0, model.vocab_size), seed=_seed(body), stop=_stop(body), stream=stream,
        include_usage=bool(options and _typed(options, "include_usage", bool, False, "stream_options.include_usage")))


def check_model(body: dict, model: ModelInfo) -> None:
    """The request's `model` names the served one (every route that runs the model asks)."""
    name = body.get("model")
    if not isinstance(name, str):
        raise APIError(400, "'model' is required: a string (GET /v1/models lists it)", "model")
    if name != model.name:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{model.name}'", "model",
                       "model_not_found")


def _completion_prompts(body, model: ModelInfo) -> tuple[tuple[int, ...], ...]:
    prompt = body.get("prompt")
    texts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        raise APIError(400, "'prompt' must be a string or a non-empty list of strings", "prompt")
    prompts = []
    for i, text in enumerate(texts):
        ids = model.tokenizer.encode_prompt(text)
        if not ids:
            raise APIError(400, f"prompt {i} encodes to no tokens; generation needs at least 1", "prompt")
        prompts.append(tuple(ids))
    return tuple(prompts)


def _chat_prompt(body, model: ModelInfo) -> tuple[tuple[int, ...]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list", "messages")
    dialogue = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else None
            raise APIError(400, f"{where}.role={role!r}: must be one of {', '.join(ROLES)}", f"{where}.role")
        dialogue.append(Message(ROLES[message["role"]], _content(message.get("content"), where)))
    problem = dialogue_problem([*dialogue, Message("assistant", "answer")])
    if problem:
        raise APIError(400, f"messages: {problem}; expected [system], user, assistant, ..., user", "messages")
    try:
        return (tuple(render_prompt(dialogue, model.tokenizer, model.template).tolist()),)
    except (ConfigError, ValueError) as e:  # a tokenizer without the template's tags (a base model's)
        raise APIError(400, f"this model cannot render a chat: {e}; use /v1/completions", "messages") from None


def _content(content, where: str) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, f"{where}.content must be a string or a list of text parts", f"{where}.content")
    return content.strip()


def _typed(body, key: str, kind: type, default, param: str = ""):
    value = body.get(key)
    if value is None:
        return default
    if type(value) is not kind:
        raise APIError(400, f"'{param or key}' must be a {kind.__name__}", param or key)
    return value


def _int(body, key: str, default: int, low: int, high: int | None) -> int:
    value = body.get(key)
    if value is None:
        return default
    if type(value) is not int or value < low or (high is not None and value > high):
        raise APIError(400, f"{key}={value!r}: must be an integer in [{low}, {'∞' if high is None else high}]", key)
    return value


def _number(body, key: str, default: float, low: float, high: float, open_low: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    ok = type(value) in (int, float) and math.isfinite(value) and (low < value if open_low else low <= value) \
        and value <= high
    if not ok:
        raise APIError(400, f"{key}={value!r}: must be a number in {'(' if open_low else '['}{low}, {high}]", key)
    return float(value)


def _seed(body) -> int | None:
    seed = body.get("seed")
    if seed is not None and type(seed) is not int:
        raise APIError(400, f"seed={seed!r}: must be an integer", "seed")
    return seed


def _stop(body) -> tuple[str, ...]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, f"'stop' must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return tuple(stops)


# --- responses --------------------------------------------------------------------------------------------
def response_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(kind: str, rid: str, model: str, chunk: bool) -> dict:
    obj = ("chat.completion" if kind == "chat" else "text_completion") + (".chunk" if chunk and kind == "chat" else "")
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model}


def choice(kind: str, index: int, text: str, finish: str | None, chunk: bool, first: bool = False) -> dict:
    if kind == "completions":
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    if not chunk:
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}
    delta = {"role": "assistant", "content": text} if first else {"content": text} if text or not finish else {}
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
