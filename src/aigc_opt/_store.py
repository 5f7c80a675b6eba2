"""Crash-safe directory writes and checksummed manifests for saved Models."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import IntegrityError, NotASavedModelError

__all__ = ["MANIFEST", "atomic_directory", "sha256_file", "write_manifest", "read_manifest",
           "verify_files", "is_saved_model"]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


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
    return (path / MANIFEST).is_file()


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it replaces ``target``.

    On any error the temporary directory is removed and ``target`` is left as it was. An
    existing ``target`` is replaced only if it is empty or itself a saved Model, so a typo
    cannot wipe an unrelated directory.
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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; a saved model gets normal permissions
    old: Path | None = None
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent)) / "previous"
            os.rename(target, old)
        os.rename(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        if old is not None and old.exists() and not target.exists():
            os.rename(old, target)  # put the previous save back
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
        raise NotASavedModelError(f"{str(directory)!r} is not a directory; Model.load takes a directory "
                                  "written by Model.save.")
    path = directory / MANIFEST
    if not path.is_file():
        raise NotASavedModelError(
            f"{str(directory)!r} has no {MANIFEST}, so it is not a directory written by Model.save."
        )
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IntegrityError(f"{str(path)!r} is not valid JSON ({e}); the save is damaged.") from None
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
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise IntegrityError(
            f"{str(path)!r} was changed after it was saved (its checksum does not match). "
            "Save the model again or restore the original file."
        )
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Raise :class:`IntegrityError` naming the first file that is missing or changed."""
    for rel, expected in manifest.get("files", {}).items():
        path = directory / rel
        if not path.is_file():
            raise IntegrityError(f"Saved model {str(directory)!r} is missing {rel!r} listed in its manifest.")
        actual = sha256_file(path)
        if actual != expected:
            raise IntegrityError(
                f"{rel!r} in {str(directory)!r} was changed after saving (sha256 {actual[:12]}... "
                f"!= {expected[:12]}... in the manifest). Save the model again or restore the file."
            )
