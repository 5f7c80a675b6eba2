"""Private temporary directories for artifacts' files, removed when the work that made them fails.

A pass that raises — or is interrupted with Ctrl-C — part-way through leaves no files behind: the
directories ``new_workdir`` made inside a ``removed_on_error()`` block are deleted before the
exception goes on. (An artifact that was built deletes its own directory when it is collected.)
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

__all__ = ["new_workdir", "removed_on_error", "PREFIX"]

PREFIX = "aigc_opt-"
_pending: ContextVar[list[Path] | None] = ContextVar("aigc_opt_workdirs", default=None)


def new_workdir(kind: str) -> Path:
    """A new private temporary directory ``aigc_opt-<kind>-XXXX``."""
    directory = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{kind}-"))
    pending = _pending.get()
    if pending is not None:
        pending.append(directory)
    return directory


@contextlib.contextmanager
def removed_on_error() -> Iterator[None]:
    """Delete the directories ``new_workdir`` makes inside the block if the block raises."""
    pending: list[Path] = []
    token = _pending.set(pending)
    try:
        yield
    except BaseException:
        for directory in pending:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    finally:
        _pending.reset(token)
