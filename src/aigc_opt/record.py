"""What a pass did to a Model (``PassRecord``) and how to replay it: Core data, no technique.

``Model.history`` is a tuple of PassRecords and a saved manifest holds them as JSON. Rebuilding a
saved model replays each record on a freshly built skeleton (NVIDIA ModelOpt's convert/restore
shape): the pass that wrote the record registers a :class:`PassPlugin` here, so ``Model.load``
finds the replay by the record's ``pass_type`` without importing ``passes/`` (aigc_opt's own
passes register when ``aigc_opt`` is imported; a third-party pass registers when its package is).

Example:
    >>> from aigc_opt.record import PASS_PLUGINS
    >>> "Quantize" in PASS_PLUGINS                     # doctest: +SKIP
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ._deps import library_versions
from ._registry import Registry
from .errors import AigcOptError, IntegrityError, UnsupportedModelError

__all__ = ["PassRecord", "PassPlugin", "PASS_PLUGINS", "register_pass_plugin", "replay", "STATE_VERSION"]

# Version of the restore state (``PassRecord.state``) this aigc_opt writes. 0: a record saved before
# restore state had its own field, whose restore keys live in ``details`` (still loaded).
STATE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class PassRecord:
    """What one pass did to a Model: kept in ``Model.history`` and in the saved manifest."""

    pass_type: str
    config: dict[str, Any]
    seconds: float
    format_before: str
    format_after: str
    size_before: int
    size_after: int
    params_before: int
    params_after: int
    changed: bool = True
    # True when low precision is only simulated (fake-quant): no speed may be claimed from it.
    simulated: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)
    # What ``restore`` needs to rebuild the pass's structure on a fresh skeleton (input shapes of a
    # PT2E graph, pruned widths, compile buckets), apart from the report in ``details``.
    state: dict[str, Any] = field(default_factory=dict)
    state_version: int = 0

    def restore_state(self) -> dict[str, Any]:
        """The state ``restore`` reads: ``state``; for a record saved before it existed
        (``state_version`` 0), ``details``, where those versions kept it."""
        if self.state_version == 0:
            return self.details
        if not 0 < self.state_version <= STATE_VERSION:
            raise IntegrityError(
                f"A {self.pass_type} record has restore state version {self.state_version}; this aigc_opt reads "
                f"versions 0 to {STATE_VERSION}. A newer aigc-opt saved it (upgrade to load it), or it is damaged."
            )
        return self.state

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PassRecord:
        """A record read back from a manifest (untrusted): every field of its declared type, else
        an :class:`IntegrityError` (not a TypeError later, when the record is printed)."""
        kept = {k: v for k, v in data.items() if k in _RECORD_TYPES}
        for name, types in _RECORD_TYPES.items():
            if name in kept and (not isinstance(kept[name], types) or (
                    isinstance(kept[name], bool) and bool not in types)):
                raise IntegrityError(f"A pass record's {name!r} is {kept[name]!r:.60}, expected "
                                     f"{' or '.join(t.__name__ for t in types)}; the history is damaged or was crafted.")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kept
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise IntegrityError(f"A pass record lacks {missing}; the history is damaged or was crafted.")
        return cls(**kept)

    def label(self) -> str:
        """Short name for report columns: ``Quantize(int8-static)``, ``Prune(ratio=0.3)``, with
        every other setting that differs from its default (see ``Pass.label``)."""
        try:
            return PASS_PLUGINS.get(self.pass_type).label(self)
        except AigcOptError:
            return self.pass_type

    def summary(self) -> str:
        ratio = self.size_after / self.size_before if self.size_before else float("nan")
        sim = " [simulated]" if self.simulated else ""
        try:
            described = PASS_PLUGINS.get(self.pass_type).describe(self)
        except AigcOptError:
            described = self.pass_type
        return (f"{described}{sim}: {self.format_before}->{self.format_after}, "
                f"size x{ratio:.2f}, {self.seconds:.2f}s")


# The JSON types of each PassRecord field, checked when a record is read from a manifest.
_RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "pass_type": (str,), "config": (dict,), "seconds": (int, float), "format_before": (str,),
    "format_after": (str,), "size_before": (int,), "size_after": (int,), "params_before": (int,),
    "params_after": (int,), "changed": (bool,), "simulated": (bool,), "details": (dict,), "versions": (dict,),
    "state": (dict,), "state_version": (int,),
}


@dataclass(frozen=True)
class PassPlugin:
    """How Core handles the records of one pass type without knowing the technique.

    ``restore(module, record, where)`` rebuilds on a freshly built module the structure the pass
    gave it (int8 weights, pruned widths) so the saved weights fit; ``describe`` and ``label``
    render the record's settings for summaries and report columns."""

    restore: Callable[[Any, PassRecord, str], Any]
    describe: Callable[[PassRecord], str]
    label: Callable[[PassRecord], str]


PASS_PLUGINS: Registry[PassPlugin] = Registry("pass type")


def register_pass_plugin(pass_type: str, plugin: PassPlugin) -> None:
    """Make records of ``pass_type`` replayable by ``Model.load`` (passes/base.register_pass does
    this for every Pass class)."""
    PASS_PLUGINS.register(pass_type, plugin)


def replay(history: tuple[PassRecord, ...], module: Any, *, where: str) -> Any:
    """``module`` with every record's structural change restored, in order."""
    unknown = sorted({r.pass_type for r in history if r.pass_type not in PASS_PLUGINS})
    if unknown:
        raise UnsupportedModelError(
            f"{where} was made with the pass(es) {unknown}, which nothing in this process registers "
            f"(known: {PASS_PLUGINS.names()}). Import the package that provides them before loading "
            "(aigc_opt's own passes register on `import aigc_opt`), or upgrade aigc-opt."
        )
    for record in history:
        module = PASS_PLUGINS.get(record.pass_type).restore(module, record, where)
    return module
