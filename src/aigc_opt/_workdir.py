"""Private temporary directories for artifacts' files, removed when the work that made them fails.

A pass that raises — or is interrupted with Ctrl-C or stopped with SIGTERM — part-way through
leaves no files behind: the directories ``new_workdir`` made inside a ``removed_on_error()``
block are deleted before the exception goes on. (An artifact that was built deletes its own
directory when it is collected.)
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from types import FrameType

__all__ = ["new_workdir", "removed_on_error", "terminate_raises", "Terminated", "PREFIX"]

PREFIX = "aigc_opt-"
_pending: ContextVar[list[Path] | None] = ContextVar("aigc_opt_workdirs", default=None)


class Terminated(SystemExit):
    """SIGTERM arrived inside :func:`terminate_raises`.

    A ``SystemExit`` (exit status 128 + SIGTERM = 143, as a shell reports a process killed by
    it): like Ctrl-C's ``KeyboardInterrupt`` it unwinds the stack, so ``finally`` blocks and
    :func:`removed_on_error` clean up, ``except Exception`` does not swallow it, and left uncaught
    it ends the process quietly."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` instead of killing the process at once.

    Python's default for SIGTERM ends the process without unwinding anything, so the work's
    temporary files stayed behind (a killed export left its full model.onnx). The handler is
    installed only where it can be and is needed: in the main thread (``signal.signal`` works
    nowhere else), and only over the default action: a handler the application installed (or
    SIG_IGN) decides for itself, and an enclosing block has ours already. The previous handler
    is back when the block ends, however it ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except ValueError:  # an interpreter without signals (embedded, WASM)
        previous = None
    if previous is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def new_workdir(kind: str) -> Path:
    """A new private temporary directory ``aigc_opt-<kind>-XXXX``."""
    directory = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-"))
    pending = _pending.get()
    if pending is not None:
        pending.append(directory)
    return directory


@contextlib.contextmanager
def removed_on_error() -> Iterator[None]:
    """Delete the directories ``new_workdir`` makes inside the block if the block raises, is
    interrupted (Ctrl-C) or is terminated (SIGTERM, see :func:`terminate_raises`)."""
    pending: list[Path] = []
    # the cleanup runs under the handler too: a SIGTERM during it still unwinds rather than kills
    with terminate_raises():
        token = _pending.set(pending)
        try:
            yield
        except BaseException:
            for directory in pending:
                shutil.rmtree(directory, ignore_errors=True)
            raise
        finally:
            _pending.reset(token)
