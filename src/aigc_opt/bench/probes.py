"""What is measured around a model call: timing with device sync, peak memory, FLOPs, threads."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from .._tree import map_tensors
from ..runtime import runtime_for

if TYPE_CHECKING:
    from ..model import Model

__all__ = ["timed_call", "peak_memory_bytes", "peak_rss_bytes", "count_flops", "pinned_threads", "on_device"]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def on_device(model: Model, batch: Any) -> Any:
    """Move a batch to the model's device once, so copies are not timed."""
    device = model.device
    return map_tensors(lambda t: t.to(device), batch)


def timed_call(model: Model, batch: Any, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    model.run(batch)
    _sync(device)
    return time.perf_counter() - start


@contextlib.contextmanager
def pinned_threads(num_threads: int | None) -> Iterator[int]:
    """Run with ``num_threads`` intra-op threads (default: as set), restoring the old value."""
    old = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """The CPU profiler's C++ side prints start/stop lines to fd 2; keep them off the user's console.

    Always fd 2, not ``sys.stderr.fileno()``: in a Jupyter kernel that is a copy of the original
    descriptor, while native code still writes to fd 2, which the kernel shows in the notebook."""
    fd = 2
    try:
        os.fstat(fd)
    except OSError:
        yield
        return
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
    saved = os.dup(fd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def peak_memory_bytes(model: Model, batch: Any, device: str) -> int | None:
    """Peak memory allocated while running one batch, above what was held before the call.

    CUDA: the caching allocator's peak. CPU: the profiler's record of every allocation and
    free of the call, summed in time order (process RSS cannot tell two models apart).
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model.run(batch)
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - before)
    from torch.profiler import ProfilerActivity, profile

    try:
        with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model.run(batch)
        events = sorted(
            (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
            key=lambda e: e.start_ns(),
        )
    except Exception:  # profiler internals vary across torch builds; memory is optional
        return None
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return int(peak)


def _rss_reader() -> Any:
    """A fast callable returning this process's resident set size in bytes, or None."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm", "rb") as f:
            f.read()

        def read() -> int:
            with open("/proc/self/statm", "rb") as f:
                return int(f.read().split()[1]) * page

        return read
    except (OSError, ValueError, AttributeError):
        try:
            import psutil  # type: ignore[import-untyped]
        except ImportError:
            return None
        process = psutil.Process()
        return lambda: process.memory_info().rss


def peak_rss_bytes(model: Model, batch: Any, interval: float = 0.0005) -> int | None:
    """Peak resident memory of the whole process while one batch runs, sampled from a thread.

    Unlike :func:`peak_memory_bytes` it sees every allocator (ONNX Runtime's arena, oneDNN scratch
    buffers, bitsandbytes), but it is the process's: it includes every model and tensor alive,
    so compare it between runs of single models, not between models sharing one process.
    None where the RSS cannot be read (no /proc and no psutil).
    """
    import threading

    read = _rss_reader()
    if read is None:
        return None
    peak = [read()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], read())
            done.wait(interval)

    thread = threading.Thread(target=sample, name="aigc_opt-rss", daemon=True)
    thread.start()
    try:
        model.run(batch)
    finally:
        done.set()
        thread.join()
    return max(peak[0], read())


def count_flops(model: Model, batch: Any) -> int | None:
    """FLOPs of one batch: torch.utils.flop_counter for torch modules (None when nothing could be
    counted: quantized kernels are opaque to it), counted from the graph for ONNX models."""
    counter = getattr(runtime_for(model.format), "count_flops", None)
    return counter(model.artifact, batch) if counter is not None else None
