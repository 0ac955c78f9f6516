"""`llm-jax serve`: a model behind an OpenAI-compatible HTTP API and a chat page (llm_jax/serve/).

Loads the checkpoint or export, compiles the decode step and every prefill width (so no request waits for a
compilation), binds the address, prints one line saying where it serves, and runs uvicorn until interrupted.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from llm_jax.cli.args import checkpoint_args
from llm_jax.errors import ConfigError


def add_commands(sub) -> None:
    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, with a chat page at /")
    checkpoint_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="0: any free port (the line printed at start names it)")
    serve.add_argument("--max-batch", type=int, default=16,
                       help="sequences decoded at once; more requests wait for a free slot")
    serve.add_argument("--max-context", type=int,
                       help="prompt + answer tokens per sequence (default: the context the model was trained for)")
    serve.add_argument("--api-key", default=os.environ.get("LLM_JAX_API_KEY"),
                       help="require 'Authorization: Bearer KEY' on /v1/ (default: $LLM_JAX_API_KEY; unset: open)")
    serve.add_argument("--name", help="the model's name in the API (default: the checkpoint directory's name)")
    serve.set_defaults(fn=_serve)


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
        from llm_jax.serve.app import Served, create_app
    except ImportError as e:
        raise ConfigError(f"llm-jax serve needs the serve extra ({e.name} is missing): "
                          "pip install -e '.[serve]'") from None
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch={args.max_batch}: must be >= 1")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port={args.port}: must be in [0, 65535]")
    if args.api_key == "":
        raise ConfigError("--api-key: empty; leave it unset for an open server")
    sock = _bind(args.host, args.port)  # first: a port in use is said now, not after minutes of compiling
    served = _load(args, Served)
    server = uvicorn.Server(uvicorn.Config(create_app(served), log_level="warning", timeout_graceful_shutdown=3))
    host, port = sock.getsockname()[:2]
    what = (f"max batch {served.engine.batch}, context {served.info.context} tokens" if served.engine else
            "reward model: POST /v1/score")
    print(f"llm-jax: serving {served.info.name} on http://{host}:{port} ({what}; chat page at /)", flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        if served.engine is not None:
            served.engine.stop()
    return 0


def _load(args: argparse.Namespace, Served):
    from llm_jax.data.chat.template import stop_ids
    from llm_jax.inference.runner import ModelRunner, default_context
    from llm_jax.serve.protocol import ModelInfo
    path = Path(args.checkpoint)
    cfg, runner, tokenizer = ModelRunner.load(path, args.step, head=None)
    name = args.name or path.resolve().name
    if runner.head == "reward":
        from llm_jax.inference.score import Scorer, eval_normaliser
        info = ModelInfo(name, tokenizer, cfg.data.chat_template, cfg.data.seq_len, cfg.model.vocab_size)
        return Served(info, scorer=Scorer(runner, cfg.data.seq_len, 32, cfg.data.chat_template),
                      normaliser=eval_normaliser(path, args.step), api_key=args.api_key)
    from llm_jax.serve.engine import Engine
    context = default_context(cfg) if args.max_context is None else args.max_context
    engine = Engine(runner, args.max_batch, context)
    print(f"llm-jax: compiling the decode step and the prefill widths for {name} ...", file=sys.stderr, flush=True)
    engine.start().warm_up()
    info = ModelInfo(name, tokenizer, cfg.data.chat_template, context, cfg.model.vocab_size,
                     max_n=min(16, engine.batch))
    return Served(info, engine=engine, stop_ids=stop_ids(tokenizer, cfg.data.chat_template), api_key=args.api_key)


def _bind(host: str, port: int) -> socket.socket:
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(2048)  # connections queue from now on, before uvicorn takes over: no refused clients
    except OSError as e:
        raise ConfigError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e})") from None
    return sock
