"""Pruning facts both the Prune pass and its structured backend need, in a leaf module so neither
imports the other for them: the importance criteria (a registry of Torch-Pruning strategies) and
the channel multiple a target's matrix units want."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._registry import Registry

if TYPE_CHECKING:
    from ..target import Target

__all__ = ["IMPORTANCES", "default_round_to"]

# Torch-Pruning importance strategies by name (strategy objects: Torch-Pruning's Importance).
IMPORTANCES: Registry[Callable[[Any], Any]] = Registry("pruning importance")
IMPORTANCES.register("l1", lambda tp: tp.importance.GroupMagnitudeImportance(p=1))
IMPORTANCES.register("l2", lambda tp: tp.importance.GroupMagnitudeImportance(p=2))
IMPORTANCES.register("taylor", lambda tp: tp.importance.GroupTaylorImportance())
IMPORTANCES.register("random", lambda tp: tp.importance.RandomImportance())


def default_round_to(target: Target) -> tuple[int, str]:
    """The channel multiple the target's matrix units want, and why: the target's data
    (``channel_multiple`` with its source, targets/*.toml), else its SIMD width in fp32 lanes."""
    if target.channel_multiple:
        source = target.sources.get("channel_multiple", "the target's data")
        return target.channel_multiple, f"channel_multiple of {target.name!r} ({source})"
    if target.simd_width_bits:
        lanes = target.simd_width_bits // 32
        return lanes, f"{target.simd_width_bits}-bit SIMD registers hold {lanes} fp32 values"
    return 1, f"no channel multiple known for {target.device_type} target {target.name!r}"
