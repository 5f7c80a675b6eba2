"""Quantization methods for torch models that keep the module's structure: torchao weight-only
int8/int4, fp8 (torchao), and fp16/bf16 casts.

Each function converts the pass's private copy in place and returns the record's details;
``Quantize.restore`` replays the same function on a freshly built skeleton before the saved
weights are loaded (torchao's tensor subclasses load with ``weights_only=True``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch

from .._deps import require
from ..errors import IncompatibleTargetError, UnsupportedModelError
from .quantize import _is_quantized, quant_method

if TYPE_CHECKING:
    from ..target import Target
    from .quantize import Quantize

__all__: list[str] = []

_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _torchao_quantize(module: torch.nn.Module, settings: Quantize, config: Any, label: str) -> dict[str, Any]:
    """Apply a torchao config to the selected layers; refuse when torchao changed none of them."""
    require("torchao", extra="quant", purpose=f"Quantize({label!r})")
    from torchao.quantization import quantize_

    selected = set(settings.selected(module))
    quantize_(module, config, filter_fn=lambda m, fqn: fqn in selected)
    quantized = sorted(n for n in selected if _is_quantized(module.get_submodule(n)))
    if not quantized:
        raise UnsupportedModelError(
            f"Quantize({label!r}): torchao left every selected layer unchanged (shapes it has no kernel "
            "for, e.g. in_features not a multiple of group_size); refusing to return an unquantized model."
        )
    return {
        "layers_quantized": len(quantized),
        "layers_skipped": sorted(n for n, m in module.named_modules()
                                 if isinstance(m, torch.nn.Linear) and n not in quantized),
    }


def _granularity(settings: Quantize) -> Any:
    from torchao.quantization import PerGroup, PerRow, PerTensor

    if settings.group_size is not None:
        return PerGroup(settings.group_size)
    return PerRow() if settings.per_channel else PerTensor()


# ---------------------------------------------------------------------------------- int8 weight-only
@quant_method(
    "int8-weight-only",
    description="int8 weights (per output channel, or per group), activations stay float: 4x smaller "
    "Linear weights, dequantized in the matmul (torchao Int8WeightOnlyConfig)",
    target_dtype="int8",
    package="torchao",
    extra="quant",
    options=("per_channel", "group_size", "skip_types"),
)
def _int8_weight_only(module: torch.nn.Module, settings: Quantize) -> dict[str, Any]:
    require("torchao", extra="quant", purpose="Quantize('int8-weight-only')")
    from torchao.quantization import Int8WeightOnlyConfig

    # set_inductor_config=False: torchao would otherwise change global inductor flags.
    config = Int8WeightOnlyConfig(granularity=_granularity(settings), set_inductor_config=False)
    details = _torchao_quantize(module, settings, config, "int8-weight-only")
    return {**details, "group_size": settings.group_size,
            "kernel": "torchao int8 weight-only (int8 weights dequantized in the matmul)",
            "note": "Fastest after Compile('inductor'); mainly a memory saving in eager mode."}


# ---------------------------------------------------------------------------------- int4 weight-only
def _check_int4(settings: Quantize, target: Target, fmt: str) -> None:
    if target.device_type != "cuda":
        raise IncompatibleTargetError(
            f"Quantize(method='int4-weight-only') needs a CUDA target: torchao's Int4WeightOnlyConfig has no "
            f"CPU kernel in this install (it needs the mslk/tinygemm kernels, and silently leaves small layers "
            f"unchanged), and target {target.name!r} is a {target.device_type} device. On CPU use "
            "method='int8-weight-only' (or 'bnb-nf4' with bitsandbytes installed)."
        )
    if settings.group_size is not None and settings.group_size not in (32, 64, 128, 256):
        raise IncompatibleTargetError(
            f"Quantize(method='int4-weight-only'): group_size={settings.group_size} has no torchao int4 kernel; "
            "use 32, 64, 128 or 256."
        )


@quant_method(
    "int4-weight-only",
    description="int4 weights in groups (default 128), bf16 activations: 8x smaller Linear weights "
    "(torchao Int4WeightOnlyConfig, CUDA tinygemm kernel)",
    device_types=("cuda",),
    package="torchao",
    extra="quant",
    options=("group_size", "skip_types"),
    check=_check_int4,
)
def _int4_weight_only(module: torch.nn.Module, settings: Quantize) -> dict[str, Any]:
    require("torchao", extra="quant", purpose="Quantize('int4-weight-only')")
    from torchao.quantization import Int4WeightOnlyConfig

    if not torch.cuda.is_available():
        raise IncompatibleTargetError("Quantize('int4-weight-only') needs a CUDA device in this process; "
                                      "none is visible (torch.cuda.is_available() is False).")
    module.to(device="cuda", dtype=torch.bfloat16)  # the int4 kernel takes bf16 activations on CUDA
    _add_cast_hooks(module, torch.bfloat16)
    config = Int4WeightOnlyConfig(group_size=settings.group_size or 128, set_inductor_config=False)
    details = _torchao_quantize(module, settings, config, "int4-weight-only")
    selected = settings.selected(module)
    if details["layers_quantized"] < len(selected):  # torchao skips shapes it cannot pack, silently
        details["layers_left_float"] = sorted(n for n in selected if not _is_quantized(module.get_submodule(n)))
    return {**details, "group_size": settings.group_size or 128, "device": "cuda",
            "kernel": "torchao int4 weight-only (tinygemm int4 x bf16)"}


# ---------------------------------------------------------------------------------- fp8
@quant_method(
    "fp8",
    description="float8 e4m3 weights and dynamically scaled float8 activations, per row "
    "(torchao Float8DynamicActivationFloat8WeightConfig; needs fp8 tensor cores, sm_89+)",
    device_types=("cuda",),
    target_dtype="fp8",
    package="torchao",
    extra="quant",
    options=("per_channel", "skip_types"),
)
def _fp8(module: torch.nn.Module, settings: Quantize) -> dict[str, Any]:
    require("torchao", extra="quant", purpose="Quantize('fp8')")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise IncompatibleTargetError("Quantize('fp8') needs a CUDA device of compute capability 8.9+ "
                                      "(Ada, Hopper, Blackwell) in this process; none is visible.")
    module.to(device="cuda", dtype=torch.bfloat16)
    _add_cast_hooks(module, torch.bfloat16)
    config = Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow() if settings.per_channel else PerTensor(), set_inductor_config=False)
    details = _torchao_quantize(module, settings, config, "fp8")
    return {**details, "device": "cuda", "kernel": "torchao float8 e4m3 (torch._scaled_mm)"}


# ---------------------------------------------------------------------------------- fp16 / bf16
def _cast_inputs(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], *,
                 dtype: torch.dtype) -> tuple[tuple[Any, ...], dict[str, Any]]:
    from .._tree import map_tensors

    cast = functools.partial(_cast_float, dtype=dtype)
    return map_tensors(cast, tuple(args)), map_tensors(cast, dict(kwargs))


def _cast_outputs(module: torch.nn.Module, args: Any, output: Any, *, dtype: torch.dtype) -> Any:
    from .._tree import map_tensors

    return map_tensors(functools.partial(_cast_float, dtype=dtype), output)


def _cast_float(t: torch.Tensor, *, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def _add_cast_hooks(module: torch.nn.Module, inner: torch.dtype, outer: torch.dtype = torch.float32) -> None:
    """Float inputs enter ``module`` as ``inner`` and its float outputs leave as ``outer``, so
    callers keep passing and receiving what they did (hooks are replayed by ``restore``)."""
    module.register_forward_pre_hook(functools.partial(_cast_inputs, dtype=inner), with_kwargs=True)
    module.register_forward_hook(functools.partial(_cast_outputs, dtype=outer))


def _half(module: torch.nn.Module, settings: Quantize, dtype: torch.dtype) -> dict[str, Any]:
    selected = set(settings.selected(module))
    layers = [n for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, *_CONVS))]
    kept = sorted(set(layers) - selected)
    # Skipped layers, and whatever module holds them, stay float32: cast everything, then put
    # the skipped ones back and let hooks cast at their boundary.
    module.to(dtype)
    for name in kept:
        layer = module.get_submodule(name)
        layer.to(torch.float32)
        _add_cast_hooks(layer, torch.float32, dtype)
    _add_cast_hooks(module, dtype)
    name = "float16" if dtype == torch.float16 else "bfloat16"
    return {"dtype": name, "layers_converted": len(selected), "layers_skipped": kept,
            "kernel": f"torch {name} kernels (whole model cast; float32 inputs/outputs cast at the boundary)"}


_HALF_FACTS = dict(dtype_policy="warn", layer_types=(torch.nn.Linear, *_CONVS), options=("skip_types",),
                   onnx_options=())


@quant_method(
    "bf16",
    description="bfloat16 weights and activations (whole-model cast; float32 in/out): 2x smaller, fast "
    "where the target has bf16 units (AVX-512 BF16/AMX, Ampere+)",
    target_dtype="bf16",
    **_HALF_FACTS,
)
def _bf16(module: torch.nn.Module, settings: Quantize) -> dict[str, Any]:
    return _half(module, settings, torch.bfloat16)


def _fp16_onnx(model: Any, settings: Quantize) -> tuple[Any, dict[str, Any]]:
    from ._quant_onnx import fp16_onnx

    return fp16_onnx(model, settings)


@quant_method(
    "fp16",
    description="float16 weights and activations (whole-model cast; float32 in/out): 2x smaller, fast on "
    "GPUs and Apple silicon; for ONNX models, onnxruntime.transformers.float16 with float32 I/O",
    target_dtype="fp16",
    onnx=_fp16_onnx,
    **_HALF_FACTS,
)
def _fp16(module: torch.nn.Module, settings: Quantize) -> dict[str, Any]:
    return _half(module, settings, torch.float16)
