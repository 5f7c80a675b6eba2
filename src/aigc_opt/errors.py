"""The one error hierarchy of aigc_opt.

Every error a user can cause is an :class:`AigcOptError` subclass whose message says what was
wrong (with the value seen) and what to do about it. Some also subclass the matching builtin
(``ValueError``, ``ImportError``, ...) so code written against the builtins keeps working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "AigcOptError",
    "ConfigError",
    "UnknownNameError",
    "IncompatibleTargetError",
    "MissingDependencyError",
    "UnsupportedModelError",
    "InvalidInputError",
    "FidelityError",
    "RecipeError",
    "IntegrityError",
    "NotASavedModelError",
    "SaveConflictError",
    "PassError",
    "closest",
]


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Names in ``choices`` closest to ``name`` (for "did you mean" hints)."""
    choices = list(choices)
    hits = difflib.get_close_matches(name, choices, n=n, cutoff=0.4)
    if not hits:  # substring matches help for short names such as "h100"
        hits = [c for c in choices if name.lower() in c.lower()][:n]
    return hits


class AigcOptError(Exception):
    """Root of every error raised on purpose by aigc_opt."""


class ConfigError(AigcOptError, ValueError):
    """A setting has a value that is out of range, of the wrong type, or an impossible combination."""


class UnknownNameError(ConfigError, LookupError):
    """A name (target, method, pass, backend) is not registered."""

    def __init__(self, kind: str, name: object, known: Iterable[str], *, also: Iterable[str] = ()):
        known = sorted(set(known))
        # "also": other accepted spellings (aliases) used for suggestions but not listed.
        hint = closest(str(name), [*known, *sorted(set(also) - set(known))])
        did_you_mean = f" Did you mean {', '.join(repr(h) for h in hint)}?" if hint else ""
        plural = kind + ("es" if kind.endswith("s") else "s")
        super().__init__(
            f"Unknown {kind} {name!r}.{did_you_mean} Known {plural}: {', '.join(known)}."
        )
        self.kind, self.name, self.known, self.suggestions = kind, name, known, hint


class IncompatibleTargetError(AigcOptError):
    """The hardware target cannot run what was asked (e.g. a CUDA-only method on a CPU)."""


class MissingDependencyError(AigcOptError, ImportError):
    """An optional package is not installed; the message holds the exact ``pip install`` line."""

    def __init__(self, package: str, extra: str | None, purpose: str, *, install: str | None = None):
        if install is None:
            install = f'pip install "aigc-opt[{extra}]"' if extra else f"pip install {package}"
        super().__init__(
            f"{purpose} needs {package!r}, which is not installed. Install it with: {install}"
        )
        self.package, self.extra, self.install_command = package, extra, install


class UnsupportedModelError(AigcOptError, TypeError):
    """The model (its type, format or structure) cannot be handled by this operation."""


class InvalidInputError(AigcOptError, ValueError):
    """Inputs given to a model (example or benchmark inputs) do not run it or have the wrong form."""


class FidelityError(AigcOptError):
    """An optimized model's outputs moved further from the original than allowed."""


class RecipeError(AigcOptError, ValueError):
    """A pipeline recipe (YAML/JSON) names an unknown pass or setting, or has a bad version."""


class IntegrityError(AigcOptError):
    """A saved model's files do not match the checksums in its manifest."""


class SaveConflictError(AigcOptError, FileExistsError):
    """Another writer created the directory a save was about to create (two saves raced)."""


class NotASavedModelError(AigcOptError, FileNotFoundError):
    """A path given to ``Model.load`` is not a directory written by ``Model.save``."""


class PassError(AigcOptError, RuntimeError):
    """A pass failed for a reason that is not one of the typed errors above (the cause is chained)."""
