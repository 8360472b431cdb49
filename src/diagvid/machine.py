"""What this machine's processor is and can do fast: recorded by benchmarks, checked before a bf16 decode."""

from __future__ import annotations

import platform
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
"""processor features that decide CPU speed here (bf16 convolutions are fast only with AMX or AVX512-BF16)"""


def _first_processor() -> dict[str, str] | None:
    """The first processor's fields in Linux's /proc/cpuinfo (None where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():  # the others repeat it
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_info() -> dict:
    """The processor's model name and which of `CPU_FLAGS` it has (Linux's /proc/cpuinfo; elsewhere the name
    `platform` knows and no flags)."""
    fields = _first_processor() or {}
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    flags = set(fields.get("flags", "").split())
    return {"cpu": name, "cpu_flags": [f for f in CPU_FLAGS if f in flags]}


def fast_bf16() -> bool | None:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16): True, False, or None when it cannot tell
    (no /proc/cpuinfo)."""
    fields = _first_processor()
    return (
        None if fields is None else bool(set(fields.get("flags", "").split()) & {"amx_bf16", "avx512_bf16"})
    )
