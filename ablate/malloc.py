"""Opt-in glibc malloc settings that keep XLA's per-step host buffers mapped (CPU speed).

XLA's CPU runtime allocates each step's temporary buffer anew on every call, from one of
its own threads: 336 MB for the medium bench model (d 256, 4 layers, length 256, batch 8).
glibc serves a request that large with a fresh mmap and unmaps it when it is freed, so every
step faults the whole buffer in again: 66,000-90,000 minor page faults per step there (jax
0.10.2, 2-core CPU). With one arena, no mmap, no trimming and transparent huge pages
(`TUNABLES`) the memory stays mapped: 0 faults per step, and that step ran x1.18-1.19 as fast
in two `ablate bench` runs, x1.01 in a third (a busier machine). But one arena makes XLA's
threads queue for malloc's lock, and the quick model of the main job, whose steps allocate
little, ran x0.77-0.93 as fast in the same runs.
So it is not the default: `ablate bench` measures both sides (its malloc line) and you choose.

glibc reads GLIBC_TUNABLES once, when the process starts. With ABLATE_MALLOC=keep the
`ablate` command starts itself again with them (`os.execve`: same process id, arguments and
streams) before doing anything else, unless GLIBC_TUNABLES is already set (yours are kept as
they are). Code that imports ablate in its own process sets them itself:
`export GLIBC_TUNABLES=` followed by `TUNABLES`. The price: a process keeps the memory of its
largest step until it exits.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

from ablate.config import ConfigError

TUNABLES = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
    "glibc.malloc.trim_threshold=4294967296:glibc.malloc.hugetlb=1"
)
OPT_IN = "ABLATE_MALLOC"  # =keep: restart the command with TUNABLES


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether to restart with `TUNABLES`: asked for, on glibc Linux, and not set already."""
    asked = environ.get(OPT_IN, "")
    if asked not in ("", "keep"):
        raise ConfigError([(OPT_IN, f"must be 'keep' or unset, got {asked!r}")])
    return (
        asked == "keep"
        and sys.platform.startswith("linux")
        and platform.libc_ver()[0] == "glibc"
        and "GLIBC_TUNABLES" not in environ
        and bool(sys.executable)
    )


def restart_with_tunables() -> None:
    """Replace this process by the same command with `TUNABLES` set (returns if not `wanted`).

    Call it first thing in a command-line entry point, never from library code: the process
    is replaced, so nothing done before it survives.
    """
    if not wanted(os.environ):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, "GLIBC_TUNABLES": TUNABLES})
