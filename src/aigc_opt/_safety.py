"""The trust boundary for saved directories: contained paths and loads that cannot unpickle.

A saved directory is untrusted input (docs/security.md). Without ``trust=True`` nothing in it may
run code or lead aigc_opt to read a file outside it. Two primitives hold that line:

- :func:`contained`: a path named by the manifest, resolved and checked to be a plain file inside
  the directory, reached through no symlink and (when the manifest's file list is given) covered
  by its checksums.
- :func:`no_unpickling`: while active in the current context, any attempt to resolve a global
  while unpickling (the ``pickle.find_class`` audit event, which every code-running pickle needs:
  ``torch.load(weights_only=False)``, ``pickle.loads``) raises instead. ``torch.load(...,
  weights_only=True)`` uses its own allowlisting unpickler and is unaffected.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import IntegrityError

__all__ = ["contained", "refuse_symlinks", "no_unpickling", "UnpicklingRefused"]


class UnpicklingRefused(pickle.UnpicklingError):
    """Raised inside :func:`no_unpickling` when a load tries to unpickle a global."""


def contained(directory: Path, rel: Any, *, listed: Mapping[str, Any] | None = None, what: str = "file") -> Path:
    """``directory / rel`` after checking it cannot lead outside ``directory``.

    ``rel`` must be a relative POSIX path without ``..``; no part of it may be a symlink; and, when
    ``listed`` (the manifest's ``files``) is given, it must be one of the files the manifest covers.
    Anything else is an :class:`IntegrityError` naming the value, since only a damaged or crafted
    manifest names such a path.
    """
    directory = Path(directory)
    if not isinstance(rel, str) or not rel or "\x00" in rel or "\\" in rel:
        raise IntegrityError(f"The manifest of {str(directory)!r} names its {what} as {rel!r:.80}; expected a "
                             "relative path inside the directory. The save is damaged or was crafted.")
    parts = PurePosixPath(rel).parts
    if PurePosixPath(rel).is_absolute() or ".." in parts or os.path.isabs(rel):
        raise IntegrityError(f"The manifest of {str(directory)!r} names its {what} as {rel!r:.80}, a path outside "
                             "the directory. A saved model only reads files inside its own directory; the save "
                             "is damaged or was crafted.")
    if listed is not None and PurePosixPath(*parts).as_posix() not in listed:
        raise IntegrityError(f"The {what} {rel!r:.80} of {str(directory)!r} is not covered by the manifest's "
                             "checksums, so it cannot be trusted. Save the model again.")
    path = directory
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise IntegrityError(f"{rel!r:.80} in {str(directory)!r} is reached through a symlink "
                                 f"({str(path)!r}); a saved model holds only plain files. Save the model again.")
    return path


def refuse_symlinks(directory: Path) -> None:
    """Raise :class:`IntegrityError` if anything inside ``directory`` is a symlink (a save never
    holds one, and following one could read a file outside the directory)."""
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        for name in (*dirnames, *filenames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                raise IntegrityError(
                    f"{os.path.relpath(full, directory)!r} in {str(directory)!r} is a symlink; a saved model "
                    "holds only plain files, and aigc_opt does not follow links out of it. Save the model again."
                )


_REFUSING: ContextVar[str | None] = ContextVar("aigc_opt_refuse_unpickling", default=None)
_hook_installed = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "pickle.find_class":
        what = _REFUSING.get()
        if what is not None:
            module, name = (list(args) + ["?", "?"])[:2]
            raise UnpicklingRefused(f"{what} asked to unpickle {module}.{name}")


@contextlib.contextmanager
def no_unpickling(what: str) -> Iterator[None]:
    """Within the block (this thread/context only), unpickling any global raises
    :class:`UnpicklingRefused`. The audit hook is added once per process (hooks cannot be
    removed) and costs one context-variable read per audit event."""
    global _hook_installed
    if not _hook_installed:
        sys.addaudithook(_audit)
        _hook_installed = True
    token = _REFUSING.set(what)
    try:
        yield
    finally:
        _REFUSING.reset(token)
