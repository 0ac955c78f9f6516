"""The host a CPU benchmark ran on, and how busy the rest of the machine was meanwhile.

A CPU step-time ratio depends on the machine as much as on the code: which vector instructions the CPU has
(XLA:CPU compiles for the host's ISA; MKL picks its kernels by CPU vendor and ISA at run time), how many
cores the process may use, each runtime's thread settings, and whether other processes shared those cores
while it was timed. On 2 cores one busy process elsewhere halves a step's speed, and PyTorch's OpenMP
barriers can make it several times slower, so the figures here come with the CPU time others used.
"""
from __future__ import annotations

import os
import platform
import re
import resource
import time
from pathlib import Path
from typing import NamedTuple

# /proc/cpuinfo flag -> the name printed, for the ISA extensions that decide float32 matmul speed.
ISA_FLAGS = {"avx2": "AVX2", "fma": "FMA", "avx512f": "AVX-512F", "avx512bw": "AVX-512BW",
             "avx512_vnni": "AVX-512-VNNI", "avx512_bf16": "AVX-512-BF16", "amx_tile": "AMX"}


def _cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    first = text.split("\n\n")[0]
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in first.splitlines()) if v}


def cpu_description() -> dict:
    """Model name, vendor, ISA flags present and absent, and the cores the process may run on."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    return {"model": info.get("model name") or platform.processor() or platform.machine(),
            "vendor": info.get("vendor_id", ""), "family_model": (info.get("cpu family"), info.get("model")),
            "isa": {name: flag in flags for flag, name in ISA_FLAGS.items()} if flags else {},
            "usable_cores": usable, "cpu_count": os.cpu_count()}


def thread_env() -> dict:
    """The environment variables that set thread counts or XLA's flags, where set."""
    names = ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT",
             "KMP_BLOCKTIME", "MKL_ENABLE_INSTRUCTIONS", "LLM_JAX_MALLOC")
    return {n: os.environ[n] for n in names if n in os.environ}


def thread_counts() -> dict:
    """Threads of this process by name (the part before any digits), e.g. XLA's and OpenMP's pools."""
    counts: dict = {}
    for task in Path("/proc/self/task").glob("*"):
        try:
            name = (task / "comm").read_text().strip().rstrip("0123456789-_/") or "?"
        except OSError:
            continue
        counts[name] = counts.get(name, 0) + 1
    return counts


class Busy(NamedTuple):
    wall: float
    machine: float  # CPU seconds all processes used (busy and steal jiffies of /proc/stat)
    own: float  # CPU seconds this process used


def busy_now() -> Busy:
    """A reading for `others_cores`; machine is NaN where /proc/stat is not there."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        # user nice system idle iowait irq softirq steal ...: steal is time the hypervisor gave elsewhere.
        machine = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        machine = float("nan")
    return Busy(time.perf_counter(), machine, usage.ru_utime + usage.ru_stime)


def others_cores(before: Busy, after: Busy) -> float:
    """Cores' worth of CPU that other processes (and the hypervisor's steal) took between two readings."""
    wall = after.wall - before.wall
    return max(0.0, (after.machine - before.machine) - (after.own - before.own)) / wall if wall > 0 else 0.0


def describe(cpu: dict) -> str:
    have = [n for n, on in cpu["isa"].items() if on]
    lacks = [n for n, on in cpu["isa"].items() if not on]
    isa = (" ".join(have) + (f" (no {', '.join(lacks)})" if lacks else "")) if cpu["isa"] else "unknown"
    family, model = cpu["family_model"]
    ident = f" ({cpu['vendor']} family {family} model {model})" if family and model else ""
    return f"{cpu['model']}{ident}; {cpu['usable_cores']} of {cpu['cpu_count']} cores usable; ISA {isa}"


def describe_env(env: dict) -> str:
    return "env " + " ".join(f"{k}={v!r}" for k, v in env.items()) if env else "no thread or XLA env variables set"


def torch_build(threads: int) -> dict:
    """What decides this PyTorch's CPU speed: version, the threads it uses, the BLAS and oneDNN it was built
    with (float32 matmuls go to MKL's sgemm where it is there), the vector ISA its kernels dispatch to."""
    import torch
    config = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([\w.]+)", config)
    onednn = re.search(r"MKL-DNN (v[\d.]+)", config)
    return {"version": torch.__version__, "threads": threads, "interop_threads": torch.get_num_interop_threads(),
            "parallel_backend": "OpenMP" if "parallel backend: OpenMP" in torch.__config__.parallel_info()
            else "native",
            "mkl": mkl.group(1) if mkl and torch.backends.mkl.is_available() else None,
            "onednn": onednn.group(1) if onednn and torch.backends.mkldnn.is_available() else None,
            "onednn_enabled": bool(torch.backends.mkldnn.enabled),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
