"""Crash-safe directory writes and checksummed manifests for saved Models.

A save is written into a work directory beside its target, ``.<name>.tmp-<host>-<pid>-XXXXXXXX/``
(the host's tag and the writing process's id are in the name from the moment it exists), as
``model/`` inside it, then put in place in one step: on Linux the two directories are exchanged
atomically (``renameat2(RENAME_EXCHANGE)``), elsewhere by two renames with the previous save
parked in the work directory between them. A process killed at any point leaves the target
holding either the previous save or the new one, complete, and at most a work directory that
has no ``manifest.json`` of its own, so it is never taken for a Model. The next save to the same
target removes work directories whose owner process is gone (and, after a kill between the two
renames of the fallback, first moves the parked previous save back).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from ._safety import contained, refuse_symlinks
from ._workdir import terminate_raises
from .errors import IntegrityError, NotASavedModelError, SaveConflictError

__all__ = ["MANIFEST", "atomic_directory", "atomic_write", "atomic_write_text", "read_user_text", "sha256_file", "write_manifest", "read_manifest",
           "verify_files", "is_saved_model", "clean_stale_saves"]

log = logging.getLogger("aigc_opt")

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 32 << 20  # far above any real manifest; bounds memory before validation
TMP_MARK = ".tmp-"  # work directories are named ".<target name>.tmp-<host tag>-<pid>-<random>"
OWNER = "owner.json"  # in a work directory: the writing process's host and start time (pid reuse)
STAGED = "model"  # in a work directory: the save being written (or, after the swap, the previous one)
PARKED = "previous"  # in a work directory: the previous save between the two renames of the fallback
FOREIGN_STALE_SECONDS = 24 * 3600  # another machine's work directory (shared filesystem) is stale after this
_HOST_TAG = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_WORK_NAME = re.compile(r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[^/]*")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_saved_model(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


# ---------------------------------------------------------------------------------- atomic files
def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any]) -> Path:
    """Write one file atomically: ``write(tmp)`` fills a temporary sibling of ``path``, which is
    fsynced and renamed over ``path``; on any error (or a kill) ``path`` keeps its previous
    content and the temporary file is removed. Every single-file write of the library (recipes,
    checkpoints, figures, reports, measurement caches) goes through here."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write` of UTF-8 text."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_user_text(path: Path, *, kind: str, error: type[Exception], directory_hint: str, text_hint: str,
                   max_bytes: int | None = None) -> str:
    """The UTF-8 text of a file the user named (a recipe, a target file), with every way reading it
    can fail said as ``error``, naming the file: missing, a directory, too large, not UTF-8, unreadable."""
    try:
        if max_bytes is not None and path.is_file() and path.stat().st_size > max_bytes:
            raise error(f"{kind} {str(path)!r} is {path.stat().st_size:,} bytes, more than the {max_bytes:,} "
                        "aigc_opt reads from such a file.")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{kind} {str(path)!r} does not exist.") from None
    except IsADirectoryError:
        raise error(f"{kind} {str(path)!r} is a directory; {directory_hint}.") from None
    except UnicodeDecodeError as e:
        raise error(f"{kind} {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}); {text_hint}.") from None
    except OSError as e:
        raise error(f"{kind} {str(path)!r} cannot be read: {e.strerror or e}.") from None


# ---------------------------------------------------------------------------------- atomic saves
@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield an empty directory to write a save into; on success it replaces ``target`` atomically.

    On any error the work directory is removed and ``target`` is left as it was. An existing
    ``target`` is replaced only if it is empty or itself a saved Model, so a typo cannot wipe an
    unrelated directory. What earlier, killed saves to ``target`` left beside it is removed first.
    """
    target = Path(target).absolute()
    if target.exists():
        if not target.is_dir():
            raise NotASavedModelError(f"Cannot save to {str(target)!r}: it exists and is a file.")
        if any(target.iterdir()) and not is_saved_model(target):
            raise NotASavedModelError(
                f"Cannot save to {str(target)!r}: it is a non-empty directory that is not a saved "
                "Model, and saving would replace its contents. Choose a new or empty directory."
            )
        if is_saved_model(target):
            _refuse_unknown_entries(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_saves(target)
    prefix = f".{target.name}{TMP_MARK}{_HOST_TAG}-{os.getpid()}-"  # who writes it, from its first moment
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        with terminate_raises():  # SIGTERM unwinds like Ctrl-C, so the finally below removes the work
            _write_owner(work)
            staged = work / STAGED
            staged.mkdir()  # mode 0777 less the umask: a saved model gets normal permissions
            yield staged
            _fsync_tree(staged)
            _swap_into_place(staged, target)
            _fsync_dir(target.parent)
    finally:
        if os.path.lexists(work / PARKED) and not os.path.lexists(target):  # could not be put back
            log.error("The previous save of %s could not be put back; it is in %s.", target, work / PARKED)
        else:  # after a successful swap the work directory holds the previous save (or nothing)
            shutil.rmtree(work, ignore_errors=True)


def _refuse_unknown_entries(target: Path) -> None:
    """A save replaces a previous save as a whole, so it must not hold anything the user put
    there: files the manifest does not list, or directories holding none of its files (e.g. an
    optimized model saved inside the one it came from)."""
    try:
        listed = json.loads((target / MANIFEST).read_text()).get("files", {})
        listed = set(listed) if isinstance(listed, dict) else set()
    except (OSError, ValueError, RecursionError, AttributeError):
        listed = set()
    ours = listed | {MANIFEST} | {PurePosixPath(f).parts[0] for f in listed if PurePosixPath(f).parts}
    unknown = sorted(p.name for p in target.iterdir() if p.name not in ours)
    if unknown:
        raise NotASavedModelError(
            f"Cannot save to {str(target)!r}: it is a saved Model that also holds {unknown[:5]} (not "
            "written by Model.save), which replacing it would delete. Move them out, or save elsewhere."
        )


def _swap_into_place(staged: Path, target: Path) -> None:
    """Put ``staged`` at ``target`` so that ``target`` never lacks a complete save."""
    if not os.path.lexists(target):
        try:
            os.rename(staged, target)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise SaveConflictError(
                f"Cannot save to {str(target)!r}: another process created it while this save was being "
                "written (two saves to one new directory at once). Nothing was changed by this save; "
                "save again to replace it, or give each writer its own directory."
            ) from None
        return
    if _exchange(staged, target):  # atomic: target is the new save, staged the previous one
        return
    # No atomic exchange here: two renames, the previous save parked in the work directory
    # between them (a kill there is repaired by the next save's clean_stale_saves).
    parked = staged.parent / PARKED
    os.rename(target, parked)
    try:
        os.rename(staged, target)
    except BaseException:
        os.rename(parked, target)
        raise


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@functools.lru_cache(maxsize=1)
def _renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Atomically exchange two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    kernel, libc or filesystem cannot, and the caller falls back to plain renames."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    log.debug("renameat2(RENAME_EXCHANGE) failed (%s); falling back to two renames", os.strerror(err))
    return False


# ---------------------------------------------------------------------------------- leftovers of killed saves
def _write_owner(work: Path) -> None:
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
    if name and name["host"] == _HOST_TAG and os.name == "posix":
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


def _parked_saves(target: Path) -> list[Path]:
    return [work / PARKED for work in _work_dirs(Path(target).absolute()) if is_saved_model(work / PARKED)]


# ---------------------------------------------------------------------------------- manifests
def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` with the sha256 of every other file and of the manifest itself."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(directory).as_posix()] = sha256_file(path)
    manifest = {"aigc_opt_manifest": MANIFEST_VERSION, **manifest, "files": files}
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))


def read_manifest(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        parked = _parked_saves(directory) if not directory.exists() else []
        hint = (f" A save to it was interrupted while swapping directories; the previous save is in "
                f"{str(parked[0])!r} (the next save to this path puts it back first, or move it back "
                "yourself)." if parked else "")
        raise NotASavedModelError(f"{str(directory)!r} is not a directory; Model.load takes a directory "
                                  f"written by Model.save.{hint}")
    path = directory / MANIFEST
    if not path.is_file():
        raise NotASavedModelError(
            f"{str(directory)!r} has no {MANIFEST}, so it is not a directory written by Model.save."
        )
    if path.is_symlink():
        raise IntegrityError(f"{str(path)!r} is a symlink; a saved model holds only plain files. Save it again.")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise IntegrityError(f"{str(path)!r} is {size:,} bytes, more than any manifest aigc_opt writes "
                             f"({MAX_MANIFEST_BYTES:,}); the save is damaged or was crafted.")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # ValueError: JSON, or a huge int
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:200]
        raise IntegrityError(f"{str(path)!r} is not valid JSON ({reason}); the save is damaged.") from None
    if not isinstance(manifest, dict) or "aigc_opt_manifest" not in manifest:
        raise NotASavedModelError(f"{str(path)!r} is not an aigc_opt manifest.")
    if manifest["aigc_opt_manifest"] != MANIFEST_VERSION:
        raise NotASavedModelError(
            f"{str(path)!r} has manifest version {manifest['aigc_opt_manifest']!r}; this aigc_opt "
            f"reads version {MANIFEST_VERSION}. Upgrade aigc-opt to load it."
        )
    missing = [k for k in ("format", "target", "architecture", "history", "files") if k not in manifest]
    if missing:
        raise NotASavedModelError(f"{str(path)!r} lacks the field(s) {missing}; it was not written by Model.save.")
    _check_shape(manifest, path)
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise IntegrityError(
            f"{str(path)!r} was changed after it was saved (its checksum does not match). "
            "Save the model again or restore the original file."
        )
    return manifest


# The top-level fields of a manifest and the JSON types they must have ("?": may be absent).
_FIELD_TYPES: dict[str, tuple[type | None, ...]] = {
    "format": (str,), "target": (dict,), "architecture": (dict, type(None)), "history": (list,),
    "files": (dict,), "manifest_sha256": (str,), "name?": (str,), "weights?": (dict,), "artifact?": (dict,),
    "versions?": (dict,), "aigc_opt_version?": (str,), "name_covers_passes?": (int,),
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_shape(manifest: dict[str, Any], path: Path) -> None:
    """Every field of the expected JSON type before anything reads it: a manifest of the wrong
    shape is an :class:`IntegrityError`, never a bare TypeError deep inside a loader."""
    for key, types in _FIELD_TYPES.items():
        name = key.rstrip("?")
        if name not in manifest and key.endswith("?"):
            continue
        if not isinstance(manifest.get(name), types):
            raise IntegrityError(f"{str(path)!r}: field {name!r} is {type(manifest.get(name)).__name__}, expected "
                                 f"{' or '.join(t.__name__ for t in types)}; the save is damaged or was crafted.")
    bad = [k for k, v in manifest["files"].items() if not isinstance(v, str) or not _SHA256.fullmatch(v)]
    if bad:
        raise IntegrityError(f"{str(path)!r}: the checksum of {bad[0]!r:.80} is not a sha256 hex digest.")
    if not all(isinstance(r, dict) for r in manifest["history"]):
        raise IntegrityError(f"{str(path)!r}: every 'history' entry must be a JSON object.")


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Raise :class:`IntegrityError` naming the first file that is missing, changed, outside the
    directory or a symlink (a save holds only plain files, and nothing outside it is ever read)."""
    refuse_symlinks(directory)
    for rel, expected in manifest.get("files", {}).items():
        path = contained(directory, rel, what="file")
        if not path.is_file():
            raise IntegrityError(f"Saved model {str(directory)!r} is missing {rel!r} listed in its manifest.")
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(
                f"{rel!r} in {str(directory)!r} was changed after saving (sha256 {actual[:12]}... "
                f"!= {expected[:12]}... in the manifest). Save the model again or restore the file."
            )
