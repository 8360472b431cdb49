"""What this machine's processor is and can do fast: recorded by benchmarks, checked before a bf16 decode."""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
"""processor features that decide CPU speed here (bf16 convolutions are fast only with AMX or AVX512-BF16)"""


def _flags() -> set[str] | None:
    """The first processor's flags in Linux's /proc/cpuinfo (None where there is no such file)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags":
                return set(value.split())
    return None


def cpu_info() -> dict:
    """The processor's model name and which of `CPU_FLAGS` it has (Linux's /proc/cpuinfo; elsewhere the name
    `platform` knows and no flags)."""
    name = platform.processor() or platform.machine() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
                break
    flags = _flags() or set()
    return {"cpu": name, "cpu_flags": [f for f in CPU_FLAGS if f in flags]}


def fast_bf16() -> bool | None:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16): True, False, or None when it cannot tell
    (no /proc/cpuinfo)."""
    flags = _flags()
    return None if flags is None else bool(flags & {"amx_bf16", "avx512_bf16"})
