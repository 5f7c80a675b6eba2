"""One frozen settings dataclass per compile backend (torchao's config-per-method pattern).

``Compile("inductor", mode=...)`` keeps its call form; underneath, the settings that belong to the
chosen backend become one of these, whose types are the rules: a ``Literal`` is the closed set of
values, ``bounded`` numbers are range-checked, ``bool`` is a real bool (:func:`aigc_opt._checks.
check_fields`). A setting of another backend cannot be given, and combinations a backend cannot
take (``buckets`` without ``shapes="buckets"``) cannot be constructed.

Example:
    >>> from aigc_opt.passes._compile_settings import InductorSettings
    >>> InductorSettings(mode="max-autotune").mode
    'max-autotune'
    >>> InductorSettings(mode="fastest")  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    aigc_opt.errors.ConfigError: Compile: mode='fastest' is not allowed. Allowed: [...]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .._checks import MAX_THREADS, bounded, check_fields
from ..errors import ConfigError

__all__ = ["InductorMode", "ShapePolicy", "OrtOptimization", "OpenVINODevice", "OpenVINOPrecision",
           "InductorSettings", "OnnxRuntimeSettings", "TensorRTSettings", "OpenVINOSettings"]

InductorMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
ShapePolicy = Literal["static", "dynamic", "buckets"]
OrtOptimization = Literal["disable", "basic", "extended", "all"]
OpenVINODevice = Literal["CPU", "GPU", "NPU"]
OpenVINOPrecision = Literal["f32", "bf16", "f16"]


@dataclass(frozen=True, kw_only=True)
class InductorSettings:
    """``torch.compile`` with TorchInductor (see ``Compile`` for each setting)."""

    mode: InductorMode = "default"
    dynamic: bool | None = None
    fullgraph: bool = False
    warmup_iters: int = bounded(3, 0, 10_000)
    shapes: ShapePolicy | None = None
    buckets: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_fields(self, "Compile")
        from ._compile_shapes import check_buckets

        object.__setattr__(self, "buckets", check_buckets(self.buckets))
        if self.buckets is not None and self.shapes != "buckets":
            raise ConfigError(f"Compile: buckets={list(self.buckets)} applies to shapes='buckets', not "
                              f"shapes={self.shapes!r}.")
        if self.shapes is not None and self.dynamic is not None:
            raise ConfigError(f"Compile: give shapes={self.shapes!r} or dynamic={self.dynamic!r}, not both "
                              "(shapes='dynamic' is dynamic=True, 'static' and 'buckets' compile static shapes).")


@dataclass(frozen=True, kw_only=True)
class OnnxRuntimeSettings:
    """An ONNX Runtime InferenceSession (see ``Compile`` for each setting)."""

    graph_optimization: OrtOptimization = "all"
    threads: int | None = bounded(None, 1, MAX_THREADS, hint="from the target")
    spin_wait: bool = False
    transformer_fusions: bool | None = None

    def __post_init__(self) -> None:
        check_fields(self, "Compile")


@dataclass(frozen=True, kw_only=True)
class TensorRTSettings:
    """A TensorRT engine built from the ONNX graph (see ``Compile`` for each setting)."""

    workspace_gb: float | None = bounded(None, 0, 4096, low_open=True)
    max_batch_multiplier: int = bounded(4, 1, 1024)

    def __post_init__(self) -> None:
        check_fields(self, "Compile")


@dataclass(frozen=True, kw_only=True)
class OpenVINOSettings:
    """An OpenVINO compiled model (see ``Compile`` for each setting)."""

    threads: int | None = bounded(None, 1, MAX_THREADS, hint="from the target")
    device: OpenVINODevice | None = None
    precision: OpenVINOPrecision | None = None
    shapes: ShapePolicy | None = None

    def __post_init__(self) -> None:
        check_fields(self, "Compile")
        if self.shapes == "buckets":
            raise ConfigError("Compile('openvino', shapes='buckets'): OpenVINO runs every length on one dynamic "
                              "compile; use shapes='dynamic' (default) or 'static' (the example's shape).")
