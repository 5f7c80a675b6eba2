"""Built recipe prefixes kept between trials, so a recipe that extends one starts from it.

Passes never change their input model, so a model built for ``Export(onnx)`` can be the start of
``Export(onnx) + Quantize(int4)`` and of ``Export(onnx) + Compile(onnxruntime)`` alike. The cache
is bounded by count and bytes (least recently used first out). Evicting an entry only drops the
cache's reference: a model built from it (or in use by a trial) holds its own references, and an
artifact's files go only when nothing refers to it any more.

Each entry keeps, with its model, ``before``: ``(pass, model it was given)`` for every step of its
prefix, what :meth:`Pass.in_pipeline` reads (Distill takes the model before the last Prune as its
default teacher), so a resumed build runs every later pass exactly as ``Pipeline.apply`` would.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._checks import check_float, check_int

if TYPE_CHECKING:
    from ..model import Model

__all__ = ["PrefixCache", "Entry"]


@dataclass
class Entry:
    """A built prefix: its model, the pipeline state after it, what it cost to build and its size."""

    model: Model
    before: list[tuple[Any, Model]]
    build_s: float  # seconds spent on this prefix's passes, over every trial that built a part of it
    size_bytes: int


class PrefixCache:
    """Built prefixes by recipe key (``max_models`` entries and ``max_bytes`` of model size at
    most; 0 models: off). Lives on one process: Ray workers each keep their own."""

    def __init__(self, max_models: int = 4, max_bytes: float = 4e9):
        check_int("PrefixCache", "max_models", max_models, low=0, high=1000)
        check_float("PrefixCache", "max_bytes", max_bytes, low=0, high=1e15, hint="bytes, e.g. 4e9")
        self.max_models, self.max_bytes = max_models, float(max_bytes)
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.hits = self.evictions = 0

    def __getstate__(self) -> dict[str, Any]:  # sent to Ray workers empty: models stay where they were built
        return {"max_models": self.max_models, "max_bytes": self.max_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_models"], state["max_bytes"])

    def longest(self, keys: list[str]) -> tuple[int, Entry | None]:
        """The longest cached prefix among ``keys`` (key of passes[:1], passes[:2], ...): (its length, entry)."""
        for n in range(len(keys), 0, -1):
            entry = self.entries.get(keys[n - 1])
            if entry is not None:
                self.entries.move_to_end(keys[n - 1])
                self.hits += 1
                return n, entry
        return 0, None

    def put(self, key: str, entry: Entry) -> None:
        if self.max_models == 0 or entry.size_bytes > self.max_bytes:
            return
        self.entries[key] = entry
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_models or self.bytes > self.max_bytes:
            self.entries.popitem(last=False)  # only the cache's reference goes; users keep theirs
            self.evictions += 1

    @property
    def bytes(self) -> int:
        return sum(e.size_bytes for e in self.entries.values())

    def clear(self) -> None:
        self.entries.clear()
