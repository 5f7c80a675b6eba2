"""Pruning facts both the Prune pass and its structured backend need, in a leaf module so neither
imports the other for them: the importance criteria (a registry of Torch-Pruning strategies) and
the channel multiple a target's matrix units want, and the rules that set a layer's size attributes
again after its channels were removed (diffusers' UNet blocks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._registry import Registry

if TYPE_CHECKING:
    from ..target import Target

__all__ = ["IMPORTANCES", "STRUCTURE_RULES", "default_round_to", "structure_rule_key"]

# Torch-Pruning importance strategies by name (strategy objects: Torch-Pruning's Importance).
IMPORTANCES: Registry[Callable[[Any], Any]] = Registry("pruning importance")
IMPORTANCES.register("l1", lambda tp: tp.importance.GroupMagnitudeImportance(p=1))
IMPORTANCES.register("l2", lambda tp: tp.importance.GroupMagnitudeImportance(p=2))
IMPORTANCES.register("taylor", lambda tp: tp.importance.GroupTaylorImportance())
IMPORTANCES.register("random", lambda tp: tp.importance.RandomImportance())


# Size attributes a layer keeps besides its weights (diffusers' Downsample2D asserts its input has
# ``self.channels`` channels). After Torch-Pruning removed channels, each registered rule is called
# as ``rule(module, args)`` from a forward pre-hook, with the layer's actual inputs, and sets them
# again; the Prune record then carries the new values, so a load replays them. Keyed by
# ``structure_rule_key``: "<top-level package>.<class name>", so no optional library is imported.
STRUCTURE_RULES: Registry[Callable[[Any, tuple[Any, ...]], None]] = Registry("pruning structure rule")


def structure_rule_key(module: Any) -> str:
    """The STRUCTURE_RULES key of a module: its class's top-level package and name."""
    cls = type(module)
    return f"{cls.__module__.partition('.')[0]}.{cls.__name__}"


def _channels_in(args: tuple[Any, ...]) -> int:
    return int(args[0].shape[1])  # (batch, channels, height, width)


def _resampler(module: Any, args: tuple[Any, ...]) -> None:
    """diffusers Downsample2D / Upsample2D: ``channels`` from the input, ``out_channels`` from the
    convolution (no convolution: pooling or interpolation keeps the channels)."""
    module.channels = _channels_in(args)
    conv = getattr(module, "conv", None) or getattr(module, "Conv2d_0", None)
    module.out_channels = getattr(conv, "out_channels", module.channels)


def _resnet_block(module: Any, args: tuple[Any, ...]) -> None:
    """diffusers ResnetBlock2D: ``in_channels`` from the input, ``out_channels`` from ``conv2``."""
    module.in_channels = _channels_in(args)
    module.out_channels = module.conv2.out_channels


def _attention(module: Any, args: tuple[Any, ...]) -> None:
    """diffusers Attention: its widths from the projections. ``heads`` stays (Torch-Pruning removes
    channels, not whole heads, so each head gets narrower) and so does ``scale``."""
    module.query_dim = module.to_q.in_features
    module.inner_dim = module.to_q.out_features
    module.inner_kv_dim = module.to_k.out_features
    module.out_dim = module.to_out[0].out_features
    if not module.is_cross_attention:
        module.cross_attention_dim = module.query_dim


STRUCTURE_RULES.register("diffusers.Downsample2D", _resampler)
STRUCTURE_RULES.register("diffusers.Upsample2D", _resampler)
STRUCTURE_RULES.register("diffusers.ResnetBlock2D", _resnet_block)
STRUCTURE_RULES.register("diffusers.Attention", _attention)


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
