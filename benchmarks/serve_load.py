"""Load on `llm-jax serve`: tokens/s and time to first token at several numbers of concurrent clients.

    python benchmarks/serve_load.py --url http://127.0.0.1:8000 [--api-key K] [--clients 1,8,32]
        [--requests 64] [--max-tokens 64] [--time-limit 120] [--json OUT]
    python benchmarks/serve_load.py --checkpoint DIR [--max-tokens 64]     # the same prompts without HTTP

With --url, each client is a thread that sends streaming /v1/completions requests one after another (greedy,
so every run does the same work) until --requests have been sent in all or --time-limit passes; loopback only.
Time to first token (TTFT) is from sending the request to its first streamed token; tokens/s is every
completion token (the server's `usage` count) over the wall time of the whole load. With --checkpoint, the
same prompts run one at a time through generate.Generator, the path of `llm-jax sample`, after a warm-up:
the single-client figures without HTTP, the server's queue or the batch of slots.
"""
import argparse
import http.client
import json
import statistics
import threading
import time
from urllib.parse import urlparse

PROMPTS = ["def main(", "import os\n", "class Config:\n    ", "    return ", "for i in range(", "# The ",
           "if __name__ == '__main__':\n", "with open("]


def one_request(netloc: str, key: str | None, model: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds in all, completion tokens) of one streamed completion."""
    conn = http.client.HTTPConnection(netloc, timeout=600)
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    start = time.perf_counter()
    conn.request("POST", "/v1/completions", body, headers)
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"serve_load: HTTP {response.status}: {response.read()[:300]!r}")
    first, tokens = None, 0
    for line in response:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk.get("choices"):
            first = time.perf_counter() - start
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    return first, time.perf_counter() - start, tokens


def load(url: str, key: str | None, clients: int, requests: int, max_tokens: int, time_limit: float) -> dict:
    netloc = urlparse(url).netloc
    conn = http.client.HTTPConnection(netloc, timeout=60)
    conn.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
    model = json.loads(conn.getresponse().read())["data"][0]["id"]
    left, lock, results = [max(requests, clients)], threading.Lock(), []
    deadline = time.perf_counter() + time_limit

    def client(c: int) -> None:
        i = c
        while time.perf_counter() < deadline:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            results.append(one_request(netloc, key, model, PROMPTS[i % len(PROMPTS)], max_tokens))
            i += clients
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return summary(clients, [r[0] for r in results], [r[1] for r in results], [r[2] for r in results], wall)


def summary(clients: int, ttft: list[float], totals: list[float], tokens: list[int], wall: float) -> dict:
    ttft = sorted(ttft)
    return {"clients": clients, "requests": len(ttft), "tokens": sum(tokens), "wall_s": round(wall, 2),
            "tokens_per_s": round(sum(tokens) / wall, 1),
            "ttft_p50_ms": round(1000 * statistics.median(ttft), 1),
            "ttft_p95_ms": round(1000 * ttft[min(len(ttft) - 1, int(0.95 * len(ttft)))], 1),
            "per_stream_tokens_per_s": round(statistics.median(n / t for n, t in zip(tokens, totals)), 1)}


def direct(checkpoint: str, requests: int, max_tokens: int) -> dict:
    """The single-client figures through generate.Generator, as `llm-jax sample` runs it (no HTTP)."""
    from llm_jax.data.chat.template import stop_ids
    from llm_jax.inference.generate import Generator, Sampling
    from llm_jax.inference.runner import ModelRunner
    cfg, runner, tokenizer = ModelRunner.load(checkpoint)
    generator, stops = Generator(runner, Sampling(temperature=0.0)), sorted(stop_ids(tokenizer, cfg.data.chat_template))
    prompts = [tokenizer.encode_prompt(p) for p in PROMPTS]
    for ids in prompts:  # compile every prompt length first, as the server does at start
        generator.generate([ids], max_tokens, stop_ids=stops)
    ttft, totals, tokens = [], [], []
    start = time.perf_counter()
    for i in range(requests):
        first = []
        t0 = time.perf_counter()
        out = generator.generate([prompts[i % len(prompts)]], max_tokens, stop_ids=stops,
                                 on_tokens=lambda step: first or first.append(time.perf_counter() - t0))
        totals.append(time.perf_counter() - t0)
        ttft.append(first[0])
        tokens.append(len(out[0]))
    return summary(1, ttft, totals, tokens, time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running `llm-jax serve` (loopback)")
    where.add_argument("--checkpoint", help="no server: the same prompts through generate.Generator")
    p.add_argument("--api-key")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--requests", type=int, default=64, help="requests per client count (at least one per client)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per client count, at most")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args()
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("serve_load: --url must be a loopback address")
    rows = ([direct(args.checkpoint, args.requests, args.max_tokens)] if args.checkpoint else
            [load(args.url, args.api_key, int(c), args.requests, args.max_tokens, args.time_limit)
             for c in args.clients.split(",")])
    print(f"{'clients':>7} {'requests':>8} {'tokens':>7} {'wall s':>7} {'tok/s':>7} {'TTFT p50 ms':>11} "
          f"{'p95 ms':>7} {'tok/s/stream':>12}")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests']:>8} {r['tokens']:>7} {r['wall_s']:>7} {r['tokens_per_s']:>7} "
              f"{r['ttft_p50_ms']:>11} {r['ttft_p95_ms']:>7} {r['per_stream_tokens_per_s']:>12}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
