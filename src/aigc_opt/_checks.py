"""Bounded number checks for settings: one rule for every pass, recipe and manifest value.

``bool`` is refused where a number is asked for (``True`` is an ``int`` in Python, so a recipe's
``threads: true`` would otherwise mean one thread), as are NaN and infinities, and values outside
``[low, high]``: a recipe is untrusted input (docs/security.md) and ``epochs: 1e12`` must fail at
load time, not run for ever.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

from .errors import ConfigError

__all__ = ["check_int", "check_float", "check_fields", "bounded", "MAX_THREADS"]

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


def bounded(default: Any, low: float, high: float, *, low_open: bool = False, hint: str = "") -> Any:
    """A dataclass field whose number must lie in ``[low, high]`` (checked by :func:`check_fields`)."""
    return dataclasses.field(default=default, metadata={"bounds": (low, high, low_open, hint)})


def check_fields(settings: Any, owner: str) -> None:
    """Check every field of the frozen settings dataclass ``settings`` against its annotation:
    ``Literal[...]`` values must be one of them, ``bool`` must be a real bool, numbers declared with
    :func:`bounded` must be in range; ``X | None`` also takes None. The types are the one source of
    the rules, so a setting's documentation, its type and its check cannot drift apart."""
    hints = typing.get_type_hints(type(settings))
    for f in dataclasses.fields(settings):
        if not f.init or f.name not in hints:
            continue
        value = getattr(settings, f.name)
        kind, optional = _strip_optional(hints[f.name])
        if value is None and optional:
            continue
        if typing.get_origin(kind) is Literal:
            _check_choice(owner, f.name, value, (*typing.get_args(kind), *((None,) if optional else ())))
        elif kind is bool and not isinstance(value, bool):
            allowed = "True, False or None" if optional else "True or False"
            raise ConfigError(f"{owner}: {f.name} must be {allowed}, got {value!r:.60}.")
        elif "bounds" in f.metadata:
            low, high, low_open, hint = f.metadata["bounds"]
            if kind is int:
                check_int(owner, f.name, value, low=int(low), high=int(high), optional=optional, hint=hint)
            else:
                check_float(owner, f.name, value, low=low, high=high, low_open=low_open, optional=optional,
                            hint=hint)


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _check_choice(owner: str, name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value in allowed and type(value) in {type(a) for a in allowed}:
        return
    from .errors import closest

    hint = closest(str(value), [str(a) for a in allowed])
    did = f" Did you mean {hint[0]!r}?" if hint else ""
    raise ConfigError(f"{owner}: {name}={value!r:.60} is not allowed.{did} Allowed: {list(allowed)}.")
