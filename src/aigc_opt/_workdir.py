"""Private temporary directories for artifacts' files, removed when the work that made them fails.

A pass that raises — or is interrupted with Ctrl-C or stopped with SIGTERM — part-way through
leaves no files behind: the directories ``new_workdir`` made inside a ``removed_on_error()``
block are deleted before the exception goes on. (An artifact that was built deletes its own
directory when it is collected.)

The same blocks leave the thread's alternate signal stack as they found it (see
:func:`signal_stack_kept`): native code run inside them can otherwise leave it unmapped,
and then the next signal (Ctrl-C, SIGTERM) kills the process with SIGSEGV.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path
from types import FrameType

__all__ = ["new_workdir", "removed_on_error", "terminate_raises", "signal_stack_kept", "signal_stack_usable",
           "repair_signal_stack", "Terminated", "PREFIX"]

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


# ------------------------------------------------------------------ the thread's alternate signal stack
# Python runs signal handlers (SIGINT's KeyboardInterrupt, SIGTERM's Terminated) with SA_ONSTACK, i.e.
# on the thread's alternate signal stack when it has one. OpenVINO's CPU plugin (ov::intel_cpu::
# SigAltStackSetup, openvino 2026.4) mmaps a new one for the thread that creates each plugin (each
# ov.Core that uses the CPU; NNCF makes several) and, when the plugin is destroyed, unmaps it and, if
# it is still the current one, puts back the one it replaced. Plugins destroyed in another order than
# they were made (a first Core freed before a second) leave the thread on an unmapped stack: the
# kernel cannot write the next signal's frame and kills the process with SIGSEGV, no traceback.
_SS_DISABLE = 2  # Linux, every architecture
_api: list = []  # [(ctypes, libc, stack_t type)] once looked up; [None] where unavailable


def _stack_api():
    if not _api:
        api = None
        if sys.platform == "linux":
            try:
                import ctypes

                class StackT(ctypes.Structure):  # glibc and musl, every Linux architecture
                    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]

                libc = ctypes.CDLL(None, use_errno=True)
                libc.sigaltstack.argtypes = [ctypes.POINTER(StackT), ctypes.POINTER(StackT)]
                libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
                api = (ctypes, libc, StackT)
            except (ImportError, OSError, AttributeError):  # no ctypes / no libc symbols: nothing to keep
                api = None
        _api.append(api)
    return _api[0]


def _current_stack(api):
    ctypes, libc, stack_t = api
    current = stack_t()
    return current if libc.sigaltstack(None, ctypes.byref(current)) == 0 else None


def _stack_usable(api, stack) -> bool:
    """False when ``stack`` (enabled) covers memory that is not mapped (``mincore`` says ENOMEM)."""
    if stack.ss_flags & _SS_DISABLE or not stack.ss_sp:
        return True
    ctypes, libc, _ = api
    import mmap

    start = stack.ss_sp - stack.ss_sp % mmap.PAGESIZE
    length = stack.ss_sp + stack.ss_size - start
    pages = ctypes.create_string_buffer((length + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
    return libc.mincore(start, length, pages) == 0 or ctypes.get_errno() != 12  # 12: ENOMEM, unmapped


def signal_stack_usable() -> bool:
    """False when this thread's alternate signal stack points at unmapped memory (the next signal
    handled here would end the process with SIGSEGV); True where that cannot be checked."""
    api = _stack_api()
    current = _current_stack(api) if api is not None else None
    return current is None or _stack_usable(api, current)


def _set_stack(api, stack) -> bool:
    ctypes, libc, _ = api
    return libc.sigaltstack(ctypes.byref(stack), None) == 0


def repair_signal_stack() -> bool:
    """Switch this thread's alternate signal stack off if it points at unmapped memory (handlers
    then run on the thread's own stack); True if it had to."""
    api = _stack_api()
    current = _current_stack(api) if api is not None else None
    if current is None or _stack_usable(api, current):
        return False
    return _set_stack(api, api[2](None, _SS_DISABLE, 0))


@contextlib.contextmanager
def signal_stack_kept() -> Iterator[None]:
    """Within the block, native code may change this thread's alternate signal stack; at its end
    the stack is the one found on entry again. One found unmapped on entry is switched off first
    (handlers then run on the thread's own stack), so a signal inside the block is handled.

    Example::

        with signal_stack_kept():
            nncf.quantize_with_accuracy_control(...)  # makes and frees OpenVINO CPU plugins
        # Ctrl-C raises KeyboardInterrupt here, as usual, instead of a SIGSEGV
    """
    repair_signal_stack()
    api = _stack_api()
    entry = _current_stack(api) if api is not None else None
    if entry is None:
        yield
        return
    try:
        yield
    finally:
        now = _current_stack(api)
        if now is not None and (now.ss_sp, now.ss_size, now.ss_flags & _SS_DISABLE) != (
                entry.ss_sp, entry.ss_size, entry.ss_flags & _SS_DISABLE):
            # put back the entry stack; if the kernel refuses it (too small once AMX is enabled),
            # keep the new one while it is mapped, else run handlers on the thread's own stack
            if not _set_stack(api, entry) and not _stack_usable(api, now):
                _set_stack(api, api[2](None, _SS_DISABLE, 0))


@contextlib.contextmanager
def terminate_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` instead of killing the process at once.

    Python's default for SIGTERM ends the process without unwinding anything, so the work's
    temporary files stayed behind (a killed export left its full model.onnx). The handler is
    installed only where it can be and is needed: in the main thread (``signal.signal`` works
    nowhere else), and only over the default action: a handler the application installed (or
    SIG_IGN) decides for itself, and an enclosing block has ours already. The previous handler
    is back when the block ends, however it ends. The block keeps the thread's alternate signal
    stack (:func:`signal_stack_kept`).
    """
    with signal_stack_kept():  # the handler (ours or Python's SIGINT) must find a mapped stack
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
