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

The work directories and the removal of stale ones are in :mod:`aigc_opt._stale_saves`; the
manifest's checksums, shape check and file verification in :mod:`aigc_opt._manifest` (both
re-exported here).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from ._manifest import (
    MANIFEST,
    MANIFEST_VERSION,
    MAX_MANIFEST_BYTES,
    check_shape,
    is_saved_model,
    manifest_digest,
    sha256_file,
    verify_files,
    write_manifest,
)
from ._stale_saves import HOST_TAG, PARKED, STAGED, TMP_MARK, clean_stale_saves, parked_saves, write_owner
from ._workdir import terminate_raises
from .errors import IntegrityError, NotASavedModelError, SaveConflictError

__all__ = ["MANIFEST", "atomic_directory", "atomic_write", "atomic_write_text", "read_user_text", "sha256_file", "write_manifest", "read_manifest",
           "verify_files", "is_saved_model", "clean_stale_saves"]

log = logging.getLogger("aigc_opt")


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
    prefix = f".{target.name}{TMP_MARK}{HOST_TAG}-{os.getpid()}-"  # who writes it, from its first moment
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        with terminate_raises():  # SIGTERM unwinds like Ctrl-C, so the finally below removes the work
            write_owner(work)
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



# ---------------------------------------------------------------------------------- manifests
def read_manifest(directory: Path) -> dict[str, Any]:
    directory = Path(directory)
    if not directory.is_dir():
        parked = parked_saves(directory) if not directory.exists() else []
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
    check_shape(manifest, path)
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        raise IntegrityError(
            f"{str(path)!r} was changed after it was saved (its checksum does not match). "
            "Save the model again or restore the original file."
        )
    return manifest
