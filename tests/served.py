"""A model served by `llm-jax serve` in a background process on 127.0.0.1, for the server's tests."""
from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 240  # import, load, and compiling every prefill width on a busy 2-core machine


@contextlib.contextmanager
def serving(checkpoint: Path, *args: str):
    """Yields the base URL ("http://127.0.0.1:PORT") of `llm-jax serve --checkpoint checkpoint --port 0 *args`;
    stops the server on exit. The server's output is kept, and shown if it fails to start."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "llm_jax", "serve", "--checkpoint", str(checkpoint),
                             "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if proc.poll() is not None:
                    raise RuntimeError("the server exited:\n" + "".join(seen)) from None
                continue
            seen.append(line)
            if "serving" in line and " on http://" in line:
                yield line.split(" on ")[1].split()[0]
                return
        raise RuntimeError("the server did not start in time:\n" + "".join(seen))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
