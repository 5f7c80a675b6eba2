"""The work directories saves are written in, and removing those that killed saves left behind.

A save to ``target`` is written in ``.<target name>.tmp-<host tag>-<pid>-XXXXXXXX/`` beside it (see
:func:`aigc_opt._store.atomic_directory`), holding an owner record (:data:`OWNER`: the writing
process's host and start time, so a reused pid is told apart), the save being written
(:data:`STAGED`) and, between the two renames of the fallback swap, the previous save
(:data:`PARKED`). :func:`clean_stale_saves` removes those whose writer is gone, first moving a
parked previous save back if the target is missing::

    clean_stale_saves(Path("out/model"))  # -> [Path("out/.model.tmp-1a2b3c4d-4242-k3j2h1g0")]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

from ._manifest import is_saved_model

__all__ = ["TMP_MARK", "OWNER", "STAGED", "PARKED", "FOREIGN_STALE_SECONDS", "HOST_TAG", "write_owner",
           "clean_stale_saves", "parked_saves"]

log = logging.getLogger("aigc_opt")

TMP_MARK = ".tmp-"  # work directories are named ".<target name>.tmp-<host tag>-<pid>-<random>"
OWNER = "owner.json"  # in a work directory: the writing process's host and start time (pid reuse)
STAGED = "model"  # in a work directory: the save being written (or, after the swap, the previous one)
PARKED = "previous"  # in a work directory: the previous save between the two renames of the fallback
FOREIGN_STALE_SECONDS = 24 * 3600  # another machine's work directory (shared filesystem) is stale after this
HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_WORK_NAME = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[^/]*")


def write_owner(work: Path) -> None:
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "pid_start": _process_start(os.getpid()),
             "created": time.time()}
    (work / OWNER).write_text(json.dumps(owner))


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3 onwards of ``/proc/<pid>/stat`` (state, ppid, ...), or None off Linux or if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _process_start(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields and len(fields) > 19 else None  # field 22: start time in ticks


def _process_alive(pid: int, started: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user's process
        pass
    fields = _proc_stat(pid)
    if fields is None:  # no /proc (not Linux): os.kill said it exists; on Linux it just exited
        return not sys.platform.startswith("linux")
    if fields[0] in ("Z", "X"):  # exited, not yet reaped
        return False
    return started is None or _process_start(pid) == started  # else its pid was reused


def _is_stale(work: Path, prefix: str) -> bool:
    """True if no live process is writing ``work`` (a work directory of a save)."""
    name = _WORK_NAME.fullmatch(work.name[len(prefix):])
    if name and name["host"] == HOST_TAG and os.name == "posix":
        try:  # written just after the directory: absent if the writer was killed in between
            started = json.loads((work / OWNER).read_text()).get("pid_start")
        except (OSError, ValueError, AttributeError):
            started = None
        return not _process_alive(int(name["pid"]), started if isinstance(started, int) else None)
    try:  # another machine's (shared filesystem), or not named by this version: by age
        return work.stat().st_mtime < time.time() - FOREIGN_STALE_SECONDS
    except OSError:
        return False


def _is_ours(work: Path) -> bool:
    """True if ``work`` holds only what :func:`atomic_directory` writes there (its owner record,
    the staged save, the parked previous one), or nothing. A directory the user named like one,
    holding anything else, is never removed."""
    try:
        return {p.name for p in work.iterdir()} <= {OWNER, STAGED, PARKED}
    except OSError:
        return False


def _work_dirs(target: Path) -> list[Path]:
    prefix = f".{target.name}{TMP_MARK}"
    try:
        entries = list(target.parent.iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if p.name.startswith(prefix) and p.is_dir() and not p.is_symlink())


def clean_stale_saves(target: Path) -> list[Path]:
    """Remove the work directories that killed saves to ``target`` left beside it; return them.

    If a kill between the two renames of the fallback swap left ``target`` missing, the previous
    save parked in the work directory is moved back first. Work directories of saves still
    running (their owner process is alive) are left alone.
    """
    target = Path(target).absolute()
    prefix = f".{target.name}{TMP_MARK}"
    removed = []
    for work in _work_dirs(target):
        if not _is_ours(work) or not _is_stale(work, prefix):
            continue
        parked = work / PARKED
        if not os.path.lexists(target) and is_saved_model(parked):
            with contextlib.suppress(OSError):
                os.rename(parked, target)
                log.warning("%s: a save was interrupted while swapping; the previous save was put back.",
                            target)
        shutil.rmtree(work, ignore_errors=True)
        log.info("removed %s, left by an interrupted save", work)
        removed.append(work)
    return removed


def parked_saves(target: Path) -> list[Path]:
    return [work / PARKED for work in _work_dirs(Path(target).absolute()) if is_saved_model(work / PARKED)]
