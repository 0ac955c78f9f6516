"""The launchers that run on this machine, and the supervision of the processes they start.

  local               one process with all of this machine's devices in one mesh: plain `llm-jax ARGS`.
  local-multiprocess  --num-processes N CPU processes on this machine, each with --devices-per-process K fake
                      devices, joined by jax.distributed (`--coordinator 127.0.0.1:PORT --num-processes N
                      --process-id I`): the multi-host code path on a laptop. Process 0's output is shown; the
                      others' only if one fails (its last lines). Takes `train` only, the command with those flags.

local_command and multiprocess_commands are pure builders; run_local and run_multiprocess start the
processes and return an exit status.
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time

from llm_jax.errors import PREEMPTED_EXIT, LaunchError

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def local_command(args: list[str]) -> list[str]:
    """`llm-jax ARGS` under this interpreter, whose environment has llm_jax installed."""
    return [sys.executable, "-m", "llm_jax", *args]


def multiprocess_commands(args: list[str], num_processes: int, devices_per_process: int,
                          port: int) -> list[tuple[dict[str, str], list[str]]]:
    """(environment additions, argv) of each process of a CPU job of `num_processes` on this machine.

    XLA_FLAGS holds only the device count here; run_multiprocess appends it to the caller's XLA_FLAGS at run
    time (replacing any other device count), so the caller's other XLA flags still apply.
    """
    check_positive(num_processes=num_processes, devices_per_process=devices_per_process)
    if not 0 < port < 65536:
        raise LaunchError(f"--port={port} is not a TCP port (1..65535)")
    if not args or args[0] != "train":
        raise LaunchError(f"local-multiprocess runs `train ...` (the command that joins processes), "
                          f"not `{shlex.join(args[:1])}`")
    env = {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{_DEVICE_COUNT_FLAG}={devices_per_process}"}
    return [(dict(env), local_command(args) + ["--coordinator", f"127.0.0.1:{port}", "--num-processes",
                                               str(num_processes), "--process-id", str(i)])
            for i in range(num_processes)]


def run_local(args: list[str]) -> int:
    """Runs `llm-jax ARGS` here; returns its exit status."""
    process = subprocess.Popen(local_command(args))
    try:
        return _supervise([process])[1]
    finally:
        _stop([process])


def run_multiprocess(args: list[str], num_processes: int, devices_per_process: int, port: int | None = None) -> int:
    """Runs the processes of multiprocess_commands; returns 0 (75: preempted), or the status of the first that
    fails, after ending the others (they could only wait for it)."""
    commands = multiprocess_commands(args, num_processes, devices_per_process, port or free_port())
    logs = [None] + [tempfile.TemporaryFile() for _ in commands[1:]]
    processes = []
    try:
        for (additions, argv), log in zip(commands, logs):
            output = {} if log is None else {"stdout": log, "stderr": subprocess.STDOUT}
            processes.append(subprocess.Popen(argv, env=_run_env(additions), **output))
        failed, status = _supervise(processes)
        if failed:  # None: all succeeded; 0: process 0 has shown its own output
            print(f"llm-jax launch: process {failed} exited with status {status}; its last lines:\n"
                  f"{_tail(logs[failed])}", file=sys.stderr)
        return status
    finally:
        _stop(processes)
        for log in logs[1:]:
            log.close()


def free_port() -> int:
    """A TCP port that is free on this machine now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_positive(**values: int) -> None:
    """Each launcher option given as name=value is at least 1."""
    for name, value in values.items():
        if value < 1:
            raise LaunchError(f"--{name.replace('_', '-')}={value}: must be at least 1")


def launch_local(opts, args: list[str]) -> int:
    """`launch local`: prints the command (--dry-run) or runs it; returns the exit status."""
    return _print_processes([({}, local_command(args))]) if opts.dry_run else run_local(args)


def launch_multiprocess(opts, args: list[str]) -> int:
    """`launch local-multiprocess`: prints each process's environment and argv (--dry-run) or runs them."""
    port = opts.port or free_port()
    commands = multiprocess_commands(args, opts.num_processes, opts.devices_per_process, port)
    if opts.dry_run:
        return _print_processes(commands)
    return run_multiprocess(args, opts.num_processes, opts.devices_per_process, port)


def process_lines(commands: list[tuple[dict[str, str], list[str]]]) -> list[str]:
    """Each process of `commands` (as multiprocess_commands gives them) as a shell line: the environment
    additions as the process gets them, then its argv. What a dry run prints."""
    return [shlex.join([f"{key}={value}" for key, value in _effective_env(additions).items()] + argv)
            for additions, argv in commands]


def _print_processes(commands: list[tuple[dict[str, str], list[str]]]) -> int:
    print("\n".join(process_lines(commands)))
    return 0


def _effective_env(additions: dict[str, str]) -> dict[str, str]:
    """The additions as a process gets them: XLA_FLAGS joined to this environment's own XLA_FLAGS."""
    env = dict(additions)
    if "XLA_FLAGS" in env:
        kept = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
        env["XLA_FLAGS"] = " ".join(kept + [env["XLA_FLAGS"]])
    return env


def _run_env(additions: dict[str, str]) -> dict[str, str]:
    return {**os.environ, **_effective_env(additions)}


def _supervise(processes: list[subprocess.Popen]) -> tuple[int | None, int]:
    """Waits for all; returns (index, status) of the first that fails, else (None, 0 or 75 if preempted).

    A preempted process is no failure: the others are saving the same checkpoint, so they are left to finish.
    """
    while True:
        try:
            statuses = [process.poll() for process in processes]
            failed = next((i for i, s in enumerate(statuses) if s not in (None, 0, PREEMPTED_EXIT)), None)
            if failed is not None:
                return failed, statuses[failed]
            if None not in statuses:
                return None, max(statuses)
            time.sleep(0.1)
        except KeyboardInterrupt:
            # Ctrl-C reached the processes too (one process group): they save a checkpoint and exit 75.
            continue


def _stop(processes: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM to the processes still running (llm-jax saves at the next step it can), SIGKILL after grace_s."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(log, lines: int = 20) -> str:
    log.seek(0)
    return "\n".join(log.read().decode(errors="replace").splitlines()[-lines:])
