"""Process-wide settings that must be made before JAX starts its backend: `import llm_jax` makes them.

On CPU, glibc malloc settings that let XLA:CPU reuse its scratch memory from one step to the next.
XLA:CPU allocates each execution's temporary buffers (318 MiB for `pretrain_tiny`'s train step) with one
malloc on a worker thread and frees them when the execution ends. glibc serves a block that large with a
fresh mmap, and a worker thread's arena falls back to mmap for anything over its 64 MB heap whatever
M_MMAP_MAX says. So every step mapped its scratch space, page-faulted it in (the kernel zeroing each page)
and unmapped it: ~80k page faults and 40% of `pretrain_tiny`'s step time on 2 cores. With one arena, no
mmap and no trimming, the freed block stays in the heap and the next step reuses it (mallopt takes the trim
threshold as an int, so scratch over 2 GiB is still given back each step). The price: memory the
process frees is kept for reuse rather than returned to the OS (the resident size stays at its peak), and
all threads share one malloc arena, which makes XLA's multi-threaded compilation ~10-25% slower. A
training run compiles once and steps thousands of times; LLM_JAX_MALLOC=system leaves malloc alone (the
test suite, which is mostly compilation, does). glibc's THP tunable (GLIBC_TUNABLES=glibc.malloc.hugetlb=1,
read only at process start) is an alternative: 2 MB pages cut the faults ~300-fold but the kernel still
zeroes every page, so the step is ~10% slower than with reuse.

On GPUs, XLA flags (GPU_XLA_FLAGS), added to XLA_FLAGS unless it already sets them.

Both must come before XLA starts its threads and reads its flags, that is before the first JAX computation:
a thread that already has a malloc arena keeps it. JAX_PLATFORMS, or else the accelerator plugins
installed, tell which backend JAX will use without starting one.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import pkgutil
import platform
import sys

# From glibc's <malloc.h>.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
MALLOC_MODES = ("reuse", "system")
malloc_mode = "system"  # what is in effect: "reuse" once reuse_freed_memory() has applied the settings

# Overlap collectives with compute (multi-GPU data/FSDP sharding): the flag NVIDIA's JAX-Toolbox images set by
# default. Others are left at XLA's defaults until measured here. XLA aborts on a flag it does not know, so
# tests/test_runtime.py checks that this jaxlib parses them all.
GPU_XLA_FLAGS = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
}


def backend() -> str:
    """The platform JAX will compute on ("cpu", "gpu", "tpu" or another plugin's), without starting it."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        first = platforms.split(",")[0].strip()
        return "gpu" if first in ("cuda", "rocm") else first
    if importlib.util.find_spec("libtpu") is not None:
        return "tpu"
    try:
        import jax_plugins  # the namespace package GPU (and other) PJRT plugins install themselves into
    except ImportError:
        return "cpu"
    names = [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
    if any("cuda" in n or "rocm" in n for n in names):
        return "gpu"
    return names[0] if names else "cpu"


def reuse_freed_memory() -> str:
    """Applies the malloc settings where they help; returns the mode in effect ("reuse" or "system")."""
    global malloc_mode
    requested = os.environ.get("LLM_JAX_MALLOC", "reuse")
    if requested not in MALLOC_MODES:
        print(f"llm_jax: ignoring LLM_JAX_MALLOC={requested!r} (expected one of {', '.join(MALLOC_MODES)})",
              file=sys.stderr)
        requested = "reuse"
    if requested == "reuse" and platform.libc_ver()[0] == "glibc" and backend() == "cpu":
        libc = ctypes.CDLL(None)
        if (libc.mallopt(_M_ARENA_MAX, 1) and libc.mallopt(_M_MMAP_MAX, 0)
                and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
            malloc_mode = "reuse"
    return malloc_mode


def with_gpu_flags(xla_flags: str) -> str:
    """XLA_FLAGS plus GPU_XLA_FLAGS, except those it sets already (the user's value wins)."""
    present = {f.split("=")[0].lstrip("-") for f in xla_flags.split()}
    extra = [f"--{k}={v}" for k, v in GPU_XLA_FLAGS.items() if k not in present]
    return " ".join([xla_flags.strip(), *extra]).strip()


def configure() -> None:
    """What `import llm_jax` runs."""
    if backend() == "gpu":
        os.environ["XLA_FLAGS"] = with_gpu_flags(os.environ.get("XLA_FLAGS", ""))
    reuse_freed_memory()
