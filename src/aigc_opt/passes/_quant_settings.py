"""One frozen settings dataclass per quantization method family (torchao's config-per-method pattern).

``Quantize("int8-static", per_channel=False)`` keeps its call form; underneath, the settings that
belong to the chosen method become one of these classes, and each method declares its class in the
registry (``@quant_method(..., settings_type=...)``). The types are the rules: a ``Literal`` is a
closed set, ``bounded`` numbers are range-checked, ``bool`` is a real bool
(:func:`aigc_opt._checks.check_fields`). A setting the method takes in no format is not a field of
its class, so it cannot be given.

What a method honours can also depend on the model's format, known only when the pass is checked
against a model: each class states it in ``honoured`` (format -> the fields that format's
implementation reads; every field is honoured by at least one format) and, for weight-only methods,
``group_sizes`` (format -> the group sizes that format's kernels have, where they are a closed set).
``Quantize.check`` reads those against the model's format, and ``Quantize`` already refuses, when it
is made, settings that no one format honours together (a model has one format).

Example:
    >>> from aigc_opt.passes._quant_settings import Int8StaticSettings
    >>> Int8StaticSettings(calibration_method="entropy").honoured["onnx"]
    ('per_channel', 'symmetric', 'calibration_method')
    >>> Int8StaticSettings(group_size=32)  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    TypeError: Int8StaticSettings.__init__() got an unexpected keyword argument 'group_size'
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Literal

from .._checks import bounded, check_fields
from ..errors import ConfigError

__all__ = [
    "MATMUL_NBITS_BLOCK_SIZES",
    "TORCH_INT4_GROUP_SIZES",
    "Bnb4BitSettings",
    "BnbBlockSize",
    "BnbInt8Settings",
    "CalibrationMethod",
    "CustomMethodSettings",
    "Fp8Settings",
    "HalfSettings",
    "Int4WeightOnlySettings",
    "Int8DynamicSettings",
    "Int8StaticSettings",
    "Int8WeightOnlySettings",
    "QuantFormat",
    "QuantSettings",
    "as_names",
]

QuantFormat = Literal["torch", "onnx", "openvino"]
CalibrationMethod = Literal["minmax", "entropy", "percentile"]
BnbBlockSize = Literal[32, 64, 128, 256, 512, 1024, 2048, 4096]  # what bitsandbytes' 4-bit kernels accept
# int4 group sizes on torch models: torch's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu) and torchao's
# CUDA tinygemm (Int4WeightOnlyConfig) take the same four; both implementations read this one statement
TORCH_INT4_GROUP_SIZES = (32, 64, 128, 256)
MATMUL_NBITS_BLOCK_SIZES = (16, 32, 64, 128, 256)  # ONNX Runtime MatMulNBits block sizes: powers of two >= 16

Honoured = Mapping[str, tuple[str, ...]]


def _by_format(**fields: tuple[str, ...]) -> Honoured:
    return MappingProxyType(fields)


def _group_size() -> Any:
    return bounded(None, 1, 1 << 20, hint="typical: 32, 64, 128")


def as_names(owner: str, name: str, value: Any, what: str) -> tuple[str, ...]:
    """``value`` (a str or a list/tuple of str) as a tuple of str, else :class:`ConfigError`."""
    if not isinstance(value, (str, list, tuple)):
        raise ConfigError(f"{owner}: {name}={value!r} is not allowed; {name} takes {what} (a str or a "
                          f"list of str), e.g. {name}=['head'].")
    names = (value,) if isinstance(value, str) else tuple(value)
    bad = [s for s in names if not isinstance(s, str)]
    if bad:
        raise ConfigError(f"{owner}: {name} takes {what} (str), got {bad!r}.")
    return names


@dataclass(frozen=True, kw_only=True)
class QuantSettings:
    """Base of the per-method settings: ``skip_types``, which every built-in method honours on
    torch models (module class names whose layers stay in full precision)."""

    honoured: ClassVar[Honoured] = _by_format(torch=("skip_types",))
    group_sizes: ClassVar[Mapping[str, tuple[int, ...]]] = MappingProxyType({})

    skip_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "skip_types", as_names("Quantize", "skip_types", self.skip_types,
                                                          "module class names"))
        check_fields(self, "Quantize")

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.init)

    @classmethod
    def honoured_in(cls, fmt: str) -> tuple[str, ...]:
        """The fields the method reads on a model in format ``fmt`` (the others must keep their default)."""
        return cls.honoured.get(fmt, ())

    def given(self) -> dict[str, Any]:
        """The fields that differ from their default (what a check refuses where it is not honoured)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.init and getattr(self, f.name) != f.default}

    @classmethod
    def check_declaration(cls) -> None:
        """A class must honour each of its fields in some format, and honour only its fields."""
        fields = set(cls.field_names())
        honoured = {name for names in cls.honoured.values() for name in names}
        if fields != honoured:
            raise ConfigError(f"{cls.__name__}: its fields {sorted(fields)} and the fields it honours "
                              f"{sorted(honoured)} differ; declare each field in honoured[format].")


@dataclass(frozen=True, kw_only=True)
class Int8DynamicSettings(QuantSettings):
    """int8 weights and int8 activations quantized at run time (torchao; ONNX quantize_dynamic).
    ``transformer_fusions`` is ONNX's only (fuse attention first, so it is quantized too)."""

    honoured: ClassVar[Honoured] = _by_format(torch=("per_channel", "symmetric", "skip_types"),
                                              onnx=("per_channel", "transformer_fusions"))
    per_channel: bool = True
    symmetric: bool | None = None
    transformer_fusions: bool | None = None


@dataclass(frozen=True, kw_only=True)
class Int8WeightOnlySettings(QuantSettings):
    """int8 weights, float activations (torchao Int8WeightOnlyConfig; ONNX MatMulNBits int8 blocks;
    NNCF INT8_ASYM, which takes no option). On torch models any group size dividing every selected
    layer's input width works (checked on the model); ONNX takes MatMulNBits' block sizes.

    On torch models the weight scales are one per output channel (the default), one per tensor
    (``per_channel=False``) or one per ``group_size`` weights of an output channel (``group_size=N``);
    ``per_channel=False`` with a ``group_size`` asks for both one scale and many, so it is refused.

    Example:
        >>> Int8WeightOnlySettings(per_channel=False, group_size=64)  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        aigc_opt.errors.ConfigError: Quantize: per_channel=False (one scale per tensor) and group_size=64 ...
    """

    honoured: ClassVar[Honoured] = _by_format(torch=("per_channel", "group_size", "skip_types"),
                                              onnx=("group_size", "symmetric", "reuse_blocks"), openvino=())
    group_sizes: ClassVar[Mapping[str, tuple[int, ...]]] = MappingProxyType({"onnx": MATMUL_NBITS_BLOCK_SIZES})
    per_channel: bool = True
    group_size: int | None = _group_size()
    symmetric: bool | None = None
    reuse_blocks: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.per_channel is False and self.group_size is not None:
            raise ConfigError(
                f"Quantize('int8-weight-only'): per_channel=False (one scale per tensor) and "
                f"group_size={self.group_size} (one scale per {self.group_size} weights of each output channel) "
                "contradict each other. For groups give group_size alone (per_channel left at True); for one "
                "scale per tensor give per_channel=False alone.")


@dataclass(frozen=True, kw_only=True)
class Int4WeightOnlySettings(QuantSettings):
    """int4 weights in groups (torchao Int4WeightOnlyConfig on CUDA; ONNX MatMulNBits int4; NNCF
    INT4_SYM/ASYM). No ``per_channel``: int4 weights are always grouped."""

    honoured: ClassVar[Honoured] = _by_format(torch=("group_size", "skip_types"),
                                              onnx=("group_size", "symmetric", "reuse_blocks"),
                                              openvino=("group_size", "symmetric"))
    group_sizes: ClassVar[Mapping[str, tuple[int, ...]]] = MappingProxyType(
        {"torch": TORCH_INT4_GROUP_SIZES, "onnx": MATMUL_NBITS_BLOCK_SIZES})
    group_size: int | None = _group_size()
    symmetric: bool | None = None
    reuse_blocks: bool = True


@dataclass(frozen=True, kw_only=True)
class Fp8Settings(QuantSettings):
    """float8 weights and activations (torchao, CUDA sm_89+): per row, or per tensor."""

    honoured: ClassVar[Honoured] = _by_format(torch=("per_channel", "skip_types"))
    per_channel: bool = True


@dataclass(frozen=True, kw_only=True)
class Int8StaticSettings(QuantSettings):
    """int8 weights and activations with calibrated scales: PT2E on torch models (its quantizer fixes
    the scheme: only ``skip_types``), ONNX Runtime quantize_static, NNCF on OpenVINO IR."""

    honoured: ClassVar[Honoured] = _by_format(torch=("skip_types",),
                                              onnx=("per_channel", "symmetric", "calibration_method"),
                                              openvino=("calibration_method",))
    per_channel: bool = True
    symmetric: bool | None = None
    calibration_method: CalibrationMethod = "minmax"


@dataclass(frozen=True, kw_only=True)
class HalfSettings(QuantSettings):
    """fp16 / bf16: a whole-model cast, no options besides ``skip_types`` (torch)."""

    honoured: ClassVar[Honoured] = _by_format(torch=("skip_types",), onnx=())


@dataclass(frozen=True, kw_only=True)
class BnbInt8Settings(QuantSettings):
    """bitsandbytes LLM.int8 (torch models only)."""


@dataclass(frozen=True, kw_only=True)
class Bnb4BitSettings(QuantSettings):
    """bitsandbytes NF4 / FP4 (torch models only); ``group_size`` is bitsandbytes' block size."""

    honoured: ClassVar[Honoured] = _by_format(torch=("skip_types", "group_size"))
    group_size: BnbBlockSize | None = None

    def __post_init__(self) -> None:
        sizes = typing.get_args(BnbBlockSize)
        if self.group_size is not None and (isinstance(self.group_size, bool) or self.group_size not in sizes):
            raise ConfigError(f"Quantize: group_size={self.group_size!r:.40} is not a bitsandbytes block size; "
                              f"use one of {list(sizes)} (default 64).")
        super().__post_init__()


@dataclass(frozen=True, kw_only=True)
class CustomMethodSettings(QuantSettings):
    """Every setting, for a method registered without its own class: what it honours per format is
    its registration's ``options`` / ``onnx_options`` (``QuantMethod.honoured``)."""

    honoured: ClassVar[Honoured] = MappingProxyType({})
    per_channel: bool = True
    symmetric: bool | None = None
    group_size: int | None = _group_size()
    reuse_blocks: bool = True
    calibration_method: CalibrationMethod = "minmax"
    transformer_fusions: bool | None = None
