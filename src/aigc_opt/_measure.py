"""Micro-benchmarks behind ``Target.measure()``: matmul peak per dtype and copy bandwidth.

Results are cached in ``~/.cache/aigc_opt/measure/`` (or ``$AIGC_OPT_CACHE``), keyed by the
CPU/GPU model, the thread count and the torch version, since they take a few seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from ._store import atomic_write_text

__all__ = ["measure_host", "cache_dir"]


def cache_dir() -> Path:
    root = os.environ.get("AIGC_OPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "aigc_opt"
    )
    return Path(root)


def _fingerprint(device: str) -> str:
    import torch

    from ._host import cpu_model_name

    name = torch.cuda.get_device_name(0) if device == "cuda" else cpu_model_name()
    key = f"{device}|{name}|{torch.get_num_threads()}|{torch.__version__}|{platform.machine()}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _best_seconds(fn: Any, sync: Any, repeats: int) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _matmul_tflops(torch: Any, device: str, dtype_name: str, n: int, sync: Any) -> float | None:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    try:
        if dtype_name == "int8":
            a = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=device)
            b = torch.randint(-128, 127, (n, n), dtype=torch.int8, device=device)
            fn = lambda: torch._int_mm(a, b)  # noqa: E731 - int8 x int8 -> int32, the real int8 kernel
        else:
            a = torch.randn(n, n, device=device, dtype=dtypes[dtype_name])
            b = torch.randn(n, n, device=device, dtype=dtypes[dtype_name])
            fn = lambda: a @ b  # noqa: E731
        seconds = _best_seconds(fn, sync, repeats=5)
    except (RuntimeError, NotImplementedError):
        return None  # no kernel for this dtype on this device
    return round(2 * n**3 / seconds / 1e12, 4)


def _copy_bandwidth_gbs(torch: Any, device: str, sync: Any) -> float:
    # Big enough to leave every cache level; a copy reads and writes each byte once.
    numel = (512 if device == "cuda" else 128) * 2**20 // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), sync, repeats=5)
    return round(2 * src.numel() * 4 / seconds / 1e9, 2)


def measure_host(device: str, *, refresh: bool = False) -> dict[str, Any]:
    """Measured ``{"peak_tflops": {dtype: TFLOP/s}, "mem_bandwidth_gbs": GB/s}`` for ``device``."""
    import torch

    path = cache_dir() / "measure" / f"{_fingerprint(device)}.json"
    if not refresh and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            pass  # a damaged cache entry is measured again
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n = 4096 if device == "cuda" else 1024
    dtypes = ["fp32", "bf16", "fp16", "int8"]
    peaks = {d: v for d in dtypes if (v := _matmul_tflops(torch, device, d, n, sync)) is not None}
    result = {"peak_tflops": peaks, "mem_bandwidth_gbs": _copy_bandwidth_gbs(torch, device, sync)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(result))
    except OSError:
        pass  # a read-only home still gets the numbers, just not cached
    return result
