"""The manifest of a saved Model: the sha256 of every file, its own checksum, its expected shape.

:func:`write_manifest` lists every file of a save with its sha256 and seals the manifest with the
sha256 of its own content; :func:`check_shape` refuses a manifest whose fields have the wrong JSON
types before anything reads them; :func:`verify_files` checks the files against it. Reading one
from a save, with what an interrupted save left said in the error, is
:func:`aigc_opt._store.read_manifest`::

    write_manifest(directory, {"format": "torch", "target": {...}, "architecture": None, "history": []})
    verify_files(directory, json.loads((directory / MANIFEST).read_text()))
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ._safety import contained, refuse_symlinks
from .errors import IntegrityError

__all__ = ["MANIFEST", "MANIFEST_VERSION", "MAX_MANIFEST_BYTES", "sha256_file", "is_saved_model", "manifest_digest",
           "write_manifest", "check_shape", "verify_files"]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 32 << 20  # far above any real manifest; bounds memory before validation


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def is_saved_model(path: Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` with the sha256 of every other file and of the manifest itself."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[path.relative_to(directory).as_posix()] = sha256_file(path)
    manifest = {"aigc_opt_manifest": MANIFEST_VERSION, **manifest, "files": files}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False))


# The top-level fields of a manifest and the JSON types they must have ("?": may be absent).
_FIELD_TYPES: dict[str, tuple[type | None, ...]] = {
    "format": (str,), "target": (dict,), "architecture": (dict, type(None)), "history": (list,),
    "files": (dict,), "manifest_sha256": (str,), "name?": (str,), "weights?": (dict,), "artifact?": (dict,),
    "versions?": (dict,), "aigc_opt_version?": (str,), "name_covers_passes?": (int,),
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def check_shape(manifest: dict[str, Any], path: Path) -> None:
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
