"""A Model's tokenizer kept with its save: written by ``Model.save`` into ``tokenizer/`` (the
tokenizer's own ``save_pretrained`` files), read back by ``Model.load``.

A tokenizer from a save is untrusted input (docs/security.md): its ``tokenizer_config.json`` may
not name files (``*_file`` keys: transformers would open the path it names, inside the save or not),
even with ``trust=True``, nor remote code (``auto_map``) unless ``trust=True``; every file was checksummed with the rest of the
save before this runs, and transformers is asked for local files only and no remote code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ._safety import contained
from .errors import IntegrityError, UnsupportedModelError

__all__ = ["TOKENIZER_DIR", "save_tokenizer", "load_tokenizer"]

log = logging.getLogger("aigc_opt")

TOKENIZER_DIR = "tokenizer"
CONFIG = "tokenizer_config.json"


def save_tokenizer(tokenizer: Any, directory: Path) -> dict[str, Any] | None:
    """Write ``tokenizer`` into ``directory/tokenizer``; the manifest's ``tokenizer`` entry, or None
    when there is none or it cannot save itself (then it is not kept, and a warning says so)."""
    if tokenizer is None:
        return None
    if not hasattr(tokenizer, "save_pretrained"):
        log.warning("The model's tokenizer (%s) has no save_pretrained; the save will not hold it.",
                    type(tokenizer).__name__)
        return None
    tokenizer.save_pretrained(str(directory / TOKENIZER_DIR))
    return {"dir": TOKENIZER_DIR, "class": type(tokenizer).__name__}


def load_tokenizer(directory: Path, entry: Any, *, files: dict[str, str], trust: bool) -> Any:
    """The tokenizer a save holds (None when it holds none)."""
    if entry is None:
        return None
    if not isinstance(entry, dict) or entry.get("dir") != TOKENIZER_DIR:
        raise IntegrityError(f"The manifest of {str(directory)!r} has a tokenizer entry aigc_opt does not write "
                             f"({entry!r:.80}).")
    config_path = contained(directory, f"{TOKENIZER_DIR}/{CONFIG}", listed=files, what="tokenizer config")
    _refuse_paths_and_code(config_path, trust=trust)
    from ._deps import require

    transformers = require("transformers", extra="hf", purpose=f"Loading the tokenizer saved in {str(directory)!r}")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(config_path.parent), local_files_only=True,
                                                          trust_remote_code=trust)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UnsupportedModelError(
            f"The tokenizer saved in {str(directory)!r} cannot be read by this transformers "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); load the tokenizer "
            "yourself and set model.tokenizer."
        ) from None


def _refuse_paths_and_code(config_path: Path, *, trust: bool) -> None:
    """A config naming files (``*_file`` keys) is refused even with trust: trust is consent to run
    the author's code, never to read outside the save. Remote code (``auto_map``) needs trust."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise IntegrityError(f"{str(config_path)!r} is not readable JSON: {e}") from None
    if not isinstance(config, dict):
        raise IntegrityError(f"{str(config_path)!r} is not a JSON object.")
    files = sorted(k for k in config if k.endswith(("_file", "_files")))
    if files:
        raise IntegrityError(
            f"{str(config_path)!r} sets {files[:5]}: transformers would open the paths they name, wherever "
            "they point, and save_pretrained never writes them. The save was changed after it was written; "
            "save the model again."
        )
    if "auto_map" in config and not trust:
        raise UnsupportedModelError(
            f"{str(config_path)!r} names remote tokenizer code (auto_map), which runs only with "
            "Model.load(..., trust=True). Load it with trust=True if you trust this directory."
        )
