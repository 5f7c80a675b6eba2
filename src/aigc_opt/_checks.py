"""Bounded number checks for settings: one rule for every pass, recipe and manifest value.

``bool`` is refused where a number is asked for (``True`` is an ``int`` in Python, so a recipe's
``threads: true`` would otherwise mean one thread), as are NaN and infinities, and values outside
``[low, high]``: a recipe is untrusted input (docs/security.md) and ``epochs: 1e12`` must fail at
load time, not run for ever.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError

__all__ = ["check_int", "check_float", "MAX_THREADS"]

MAX_THREADS = 4096  # more threads than any machine has cores: a recipe asking for 1e9 is an error


def check_int(owner: str, name: str, value: Any, *, low: int, high: int, optional: bool = False,
              hint: str = "") -> None:
    """Raise :class:`ConfigError` unless ``value`` is an int (not a bool) in ``[low, high]``
    (or None, when ``optional``; ``hint`` says what None means)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        none = f" or None{f' ({hint})' if hint else ''}" if optional else ""
        raise ConfigError(f"{owner}: {name}={value!r:.60} is not allowed; it must be an int >= {low} "
                          f"(between {low} and {high}){none}; got {value!r:.60}.")


def check_float(owner: str, name: str, value: Any, *, low: float, high: float, low_open: bool = False,
                optional: bool = False, hint: str = "") -> None:
    """Raise :class:`ConfigError` unless ``value`` is a finite real number (not a bool) in
    ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if value is None and optional:
        return
    ok = (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
          and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        none = f" or None{f' ({hint})' if hint else ''}" if optional else ""
        raise ConfigError(f"{owner}: {name}={value!r:.60} is not allowed; it must be a finite number "
                          f"{'>' if low_open else '>='} {low:g} and <= {high:g}{none}; got {value!r:.60}.")
