"""glibc malloc settings that let XLA:CPU reuse its scratch memory from one step to the next.

XLA:CPU allocates each execution's temporary buffers (333 MB for `pretrain_tiny`'s train step) with one
malloc on a worker thread and frees them when the execution ends. glibc serves a block that large with a
fresh mmap, and a worker thread's arena falls back to mmap for anything over its 64 MB heap whatever
M_MMAP_MAX says. So every step mapped its scratch space, page-faulted it in (the kernel zeroing each page)
and unmapped it: ~80k page faults and 40% of `pretrain_tiny`'s step time on 2 cores. With one arena, no
mmap and no trimming, the freed block stays in the heap and the next step reuses it.

`import llm_jax` applies this, which must happen before XLA starts its threads (before the first JAX
computation): a thread that already has an arena keeps it. It applies only where glibc is the C library
and JAX computes on the CPU (on GPUs and TPUs a step's scratch memory lives on the device), and
LLM_JAX_MALLOC=system turns it off. The price: memory the process frees is kept for reuse instead of being
returned to the OS, so the resident size stays at its peak, and all threads share one malloc arena.
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
MODES = ("reuse", "system")
mode = "system"  # what is in effect: "reuse" once reuse_freed_memory() has applied the settings


def runs_on_cpu() -> bool:
    """Whether JAX will compute on the CPU, decided without starting a backend (which starts XLA's threads)."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    if importlib.util.find_spec("libtpu") is not None:
        return False
    try:
        import jax_plugins  # the namespace package GPU (and other) PJRT plugins install themselves into
    except ImportError:
        return True
    return not any(pkgutil.iter_modules(jax_plugins.__path__))


def reuse_freed_memory() -> str:
    """Applies the settings where they help; returns the mode in effect ("reuse" or "system")."""
    global mode
    requested = os.environ.get("LLM_JAX_MALLOC", "reuse")
    if requested not in MODES:
        print(f"llm_jax: ignoring LLM_JAX_MALLOC={requested!r} (expected one of {', '.join(MODES)})",
              file=sys.stderr)
        requested = "reuse"
    if requested == "reuse" and platform.libc_ver()[0] == "glibc" and runs_on_cpu():
        libc = ctypes.CDLL(None)
        if (libc.mallopt(_M_ARENA_MAX, 1) and libc.mallopt(_M_MMAP_MAX, 0)
                and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)):
            mode = "reuse"
    return mode
