"""What this machine is, read from the operating system: CPU model, flags, memory.

Host probing lives here, apart from the Target data it fills (target.py) and the micro-benchmarks
that measure it (_measure.py), so neither imports the other for it.
"""

from __future__ import annotations

import os
import platform

__all__ = ["cpu_flags", "cpu_model_name", "host_memory_gb", "cpu_arch", "INTERESTING_FLAGS"]


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return 1.0


def cpu_arch(machine: str, flags: set[str]) -> tuple[str, tuple[str, ...], int | None]:
    """(arch string, dtypes with native fast paths, SIMD width in bits) from the CPU flags."""
    dtypes = ["fp32", "int8"]
    if machine in ("x86_64", "amd64", "AMD64"):
        if {"amx_bf16", "amx_int8"} <= flags:
            arch = "x86_64-amx"
        elif "avx512_vnni" in flags:
            arch = "x86_64-avx512_vnni"
        elif "avx512f" in flags:
            arch = "x86_64-avx512"
        elif "avx2" in flags:
            arch = "x86_64-avx2"
        else:
            arch = "x86_64"
        if "avx512_bf16" in flags or "amx_bf16" in flags:
            dtypes.append("bf16")
        if "avx512_fp16" in flags or "amx_fp16" in flags:
            dtypes.append("fp16")
        simd = 512 if "avx512f" in flags else 256 if "avx2" in flags else 128
        return arch, tuple(dtypes), simd
    if machine in ("aarch64", "arm64"):
        arch = "aarch64-sve" if "sve" in flags else "aarch64"
        if "bf16" in flags:
            dtypes.append("bf16")
        if "fphp" in flags or "asimdhp" in flags or platform.system() == "Darwin":
            dtypes.append("fp16")
        return arch, tuple(dtypes), 128
    return machine, tuple(dtypes), None


INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                      "amx_bf16", "amx_int8", "amx_fp16", "avx_vnni", "sve", "bf16", "i8mm", "asimddp")
