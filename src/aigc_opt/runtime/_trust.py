"""The refusal a runtime gives when loading its saved format can run code and the caller did not consent."""

from __future__ import annotations

from pathlib import Path

from ..errors import UnsupportedModelError

__all__ = ["require_trust"]


def require_trust(trust: bool, directory: Path, holds: str, alternative: str) -> None:
    """Raise unless ``trust``: ``directory`` holds ``holds`` (what it is and how loading it runs code);
    ``alternative`` is the way to the same model without that consent."""
    if not trust:
        raise UnsupportedModelError(
            f"{str(directory)!r} holds {holds}. Load it with trust=True if you trust this directory "
            f"(from the command line: --trust), or {alternative}."
        )
