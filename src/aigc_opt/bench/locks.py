"""A machine-wide lock for timing: exclusive while one measurement times, shared while others build.

``benchmarks/`` scripts and ``ao.tune`` take the same kind of ``flock`` on a file, so two timings on
one machine never overlap, and no build runs while something times.

Example:
    >>> from aigc_opt.bench.locks import cpu_lock
    >>> with cpu_lock("/tmp/example.lock", exclusive=False):  # building: others may build too
    ...     pass
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator

__all__ = ["cpu_lock"]


@contextlib.contextmanager
def cpu_lock(path: str | os.PathLike[str] | None, exclusive: bool) -> Iterator[None]:
    """``flock`` on ``path`` for the block: exclusive while timing, shared while building, so that
    processes sharing a machine never time while another one works; nothing when ``path`` is None
    or empty."""
    if not path:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
