"""Quantization methods for torch models that keep the module's structure: torchao int8 dynamic,
weight-only int8/int4 and fp8 (torchao); the fp16/bf16 casts are in ``_quant_half``.

Each function converts the pass's private copy in place and returns the record's details;
``Quantize.restore`` replays the same function on a freshly built skeleton before the saved
weights are loaded (torchao's tensor subclasses load with ``weights_only=True``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .._deps import require
from ..errors import ConfigError, IncompatibleTargetError, UnsupportedModelError
from ._quant_half import add_cast_hooks
from ._quant_nbits import check_nbits
from ._quant_registry import TORCHAO, is_quantized as _is_quantized, quant_method
from ._quant_settings import (
    Fp8Settings,
    Int4WeightOnlySettings,
    Int8DynamicSettings,
    Int8WeightOnlySettings,
)

if TYPE_CHECKING:
    from ..target import Target
    from .quantize import Quantize

__all__: list[str] = []


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


def _in_features(layer: torch.nn.Module) -> int | None:
    return getattr(layer, "in_features", getattr(layer, "nx", None))  # nn.Linear, or GPT-2's Conv1D


def _one_input_feature(layer: torch.nn.Module) -> str | None:
    """torchao's int8 kernels fail on a layer with a single input feature (Linear(1, n)): keep it float."""
    in_features = _in_features(layer)
    return ("in_features=1: torchao's int8 kernels fail on a single input feature (and int8 saves nothing "
            "there)") if in_features == 1 else None


def _check_group_size(settings: Quantize, layers: dict[str, torch.nn.Module]) -> None:
    """Weight groups run along the input axis: group_size must divide every selected layer's in_features."""
    if settings.group_size is None:
        return
    widths = {n: _in_features(m) or 0 for n, m in layers.items()}
    bad = {n: w for n, w in widths.items() if w % settings.group_size}
    if not bad:
        return
    common = math.gcd(*widths.values())
    fits = [g for g in (256, 128, 64, 32, 16, 8, 4, 2) if common % g == 0]
    shown = ", ".join(f"{n} (in_features={w})" for n, w in list(bad.items())[:3]) + (
        f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    raise ConfigError(
        f"Quantize(method={settings.method!r}): group_size={settings.group_size} does not divide the input "
        f"width of {shown}; weight groups run along the input features. Use "
        + (f"group_size={fits[0]} (divides every layer's in_features), " if fits else "")
        + "group_size=None (one scale per output channel), or skip= those layers."
    )


def _granularity(settings: Quantize) -> Any:
    from torchao.quantization import PerGroup, PerRow, PerTensor

    if settings.group_size is not None:
        return PerGroup(settings.group_size)
    return PerRow() if settings.per_channel else PerTensor()


# ---------------------------------------------------------------------------------- int8 dynamic
def _int8_dynamic_onnx(model: Any, settings: Quantize) -> tuple[Any, dict[str, Any]]:
    from ._quant_onnx import int8_dynamic_onnx

    return int8_dynamic_onnx(model, settings)


@quant_method(
    "int8-dynamic",
    description="int8 weights per output channel + int8 activations per token at run time "
    "(torchao Int8DynamicActivationInt8WeightConfig; real int8 matmul kernels); for ONNX models, "
    "onnxruntime.quantization.quantize_dynamic",
    target_dtype="int8",
    **TORCHAO,
    onnx=_int8_dynamic_onnx,
    settings_type=Int8DynamicSettings,
    keep_float=_one_input_feature,
)
def _int8_dynamic(module: torch.nn.Module, settings: Quantize) -> dict[str, Any]:
    # Per-channel weights + per-token activations: the accurate variant (MiniLM embedding
    # cosine 0.998 vs 0.946 for torch.ao's per-tensor quantize_dynamic).
    require("torchao", extra="quant", purpose="Quantize('int8-dynamic')")
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, MappingType, quantize_

    selected = set(settings.selected(module))
    # set_inductor_config=False: torchao would otherwise change global inductor flags.
    # symmetric=False: asymmetric (zero-point) activations, for inputs far from zero-centred.
    act = MappingType.ASYMMETRIC if settings.symmetric is False else MappingType.SYMMETRIC
    config = Int8DynamicActivationInt8WeightConfig(
        set_inductor_config=False, granularity=_granularity(settings), act_mapping_type=act)
    quantize_(module, config, filter_fn=lambda m, fqn: fqn in selected)
    quantized = [n for n in selected if _is_quantized(module.get_submodule(n))]
    if not quantized:
        raise UnsupportedModelError(
            "Quantize('int8-dynamic'): torchao left every selected layer unchanged; refusing to "
            "return an unquantized model as if it were quantized."
        )
    return {
        "layers_quantized": len(quantized),
        "layers_skipped": sorted(n for n, m in module.named_modules()
                                 if isinstance(m, torch.nn.Linear) and n not in quantized),
        "kernel": "torchao int8 dynamic (int8 x int8 -> int32 matmul)",
        "note": "On CPU this is fast after Compile('inductor'); in eager mode it can be slower than fp32.",
    }


# ---------------------------------------------------------------------------------- int8 weight-only
def _check_nbits_onnx(settings: Quantize, target: Target, fmt: str) -> None:
    if fmt == "onnx":
        check_nbits(settings, target, fmt)


def _matmul_nbits(bits: int) -> Callable[[Any, Quantize], tuple[Any, dict[str, Any]]]:
    """The ONNX implementation of an int4/int8 weight-only method: ONNX Runtime MatMulNBits blocks."""

    def quantize_onnx(model: Any, settings: Quantize) -> tuple[Any, dict[str, Any]]:
        from ._quant_nbits import matmul_nbits_onnx

        return matmul_nbits_onnx(model, settings, bits=bits)

    return quantize_onnx


@quant_method(
    "int8-weight-only",
    description="int8 weights (per output channel, or per group), activations stay float: 4x smaller "
    "Linear weights, dequantized in the matmul (torchao Int8WeightOnlyConfig); for ONNX models, ONNX "
    "Runtime MatMulNBits int8 blocks (default 32)",
    target_dtype="int8",
    **TORCHAO,
    settings_type=Int8WeightOnlySettings,
    onnx=_matmul_nbits(8),
    keep_float=_one_input_feature,
    check_layers=_check_group_size,
    check=_check_nbits_onnx,
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
    if fmt == "onnx":  # MatMulNBits: CPU and CUDA kernels
        check_nbits(settings, target, fmt)
        return
    sizes = Int4WeightOnlySettings.group_sizes["torch"]  # TORCH_INT4_GROUP_SIZES: CPU kernel and tinygemm
    if settings.group_size is not None and settings.group_size not in sizes:
        raise IncompatibleTargetError(
            f"Quantize(method='int4-weight-only'): group_size={settings.group_size} has no int4 kernel on "
            f"{target.device_type} (torch's CPU int4 kernel, torchao's CUDA tinygemm); use one of {list(sizes)}."
        )


def _int4_device(target: Target | None, state: dict[str, Any] | None = None) -> str:
    """Where the int4 layers run: the target's device, or for a restore the recorded one."""
    if state is not None:
        return state.get("device", "cuda")  # records from before CPU int4 were all CUDA
    return "cpu" if target is not None and target.device_type == "cpu" else "cuda"


def _int4_restore(module: torch.nn.Module, settings: Quantize, state: dict[str, Any]) -> torch.nn.Module:
    _int4_weight_only(module, settings, device=_int4_device(None, state))
    return module


@quant_method(
    "int4-weight-only",
    description="int4 weights in groups, bf16 activations: 8x smaller Linear weights; on CPU torch's int4 "
    "kernel (aten._weight_int4pack_mm_for_cpu, groups of 32 by default: a Q4_1 GGUF's own blocks), on CUDA "
    "torchao Int4WeightOnlyConfig (tinygemm, groups of 128); for ONNX models, ONNX Runtime MatMulNBits "
    "int4 blocks (default 32) on CPU or CUDA, int8 activations where the CPU has int8 dot products",
    device_types=("cpu", "cuda"),
    onnx_device_types=("cpu", "cuda"),
    **TORCHAO,
    settings_type=Int4WeightOnlySettings,
    onnx=_matmul_nbits(4),
    check=_check_int4,
    check_layers=_check_group_size,
    takes_target=True,
    shared_state_keys=("device",),
    restore=_int4_restore,
)
def _int4_weight_only(module: torch.nn.Module, settings: Quantize, target: Target | None = None, *,
                      device: str | None = None) -> dict[str, Any]:
    if (device or _int4_device(target)) == "cpu":  # plain buffers, no torchao needed
        from ._quant_torch_int4cpu import int4_cpu_weight_only

        return int4_cpu_weight_only(module, settings.group_size or 32, settings.selected(module))
    require("torchao", extra="quant", purpose="Quantize('int4-weight-only')")
    from torchao.quantization import Int4WeightOnlyConfig

    if not torch.cuda.is_available():
        raise IncompatibleTargetError("Quantize('int4-weight-only') needs a CUDA device in this process; "
                                      "none is visible (torch.cuda.is_available() is False).")
    module.to(device="cuda", dtype=torch.bfloat16)  # the int4 kernel takes bf16 activations on CUDA
    add_cast_hooks(module, torch.bfloat16)
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
    **TORCHAO,
    settings_type=Fp8Settings,
)
def _fp8(module: torch.nn.Module, settings: Quantize) -> dict[str, Any]:
    require("torchao", extra="quant", purpose="Quantize('fp8')")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor

    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        raise IncompatibleTargetError("Quantize('fp8') needs a CUDA device of compute capability 8.9+ "
                                      "(Ada, Hopper, Blackwell) in this process; none is visible.")
    module.to(device="cuda", dtype=torch.bfloat16)
    add_cast_hooks(module, torch.bfloat16)
    config = Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow() if settings.per_channel else PerTensor(), set_inductor_config=False)
    details = _torchao_quantize(module, settings, config, "fp8")
    return {**details, "device": "cuda", "kernel": "torchao float8 e4m3 (torch._scaled_mm)"}
