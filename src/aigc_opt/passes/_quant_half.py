"""Quantize methods ``fp16`` and ``bf16`` for torch models: the whole model cast, but for skipped
layers (and layers tied to them), which stay float32 islands; float inputs and outputs are cast at
the model's boundaries by forward hooks (:func:`add_cast_hooks`, also used by ``fp8``), which
``Quantize.restore`` replays by running the method again. ONNX models go to
``_quant_onnx.fp16_onnx``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from ._prune_hf import is_conv1d
from ._quant_registry import quant_method
from ._quant_settings import HalfSettings

if TYPE_CHECKING:
    from .quantize import Quantize

__all__ = ["add_cast_hooks"]

_CONVS = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


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


def add_cast_hooks(module: torch.nn.Module, inner: torch.dtype, outer: torch.dtype = torch.float32) -> None:
    """Float inputs enter ``module`` as ``inner`` and its float outputs leave as ``outer``, so
    callers keep passing and receiving what they did (hooks are replayed by ``restore``)."""
    module.register_forward_pre_hook(functools.partial(_cast_inputs, dtype=inner), with_kwargs=True)
    module.register_forward_hook(functools.partial(_cast_outputs, dtype=outer))


def _inside(name: str, roots: list[str]) -> bool:
    return any(r == "" or name == r or name.startswith(r + ".") for r in roots)


# Modules that use a child layer's weights without calling it, so no hook can cast at its boundary.
_READS_CHILDREN = (torch.nn.MultiheadAttention,)


def _is_layer(m: torch.nn.Module) -> bool:  # what fp16/bf16 select; skipped Conv1D stay Conv1D
    return isinstance(m, (torch.nn.Linear, *_CONVS)) or is_conv1d(m)


def _own_tensors(m: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(k, t) for k, t in (*m._parameters.items(), *m._buffers.items()) if t is not None]


def _float32_islands(module: torch.nn.Module, settings: Quantize) -> tuple[list[str], dict[str, str]]:
    """The top-most modules an fp16/bf16 cast leaves in float32: skip_types modules, layers not
    selected (skip=), and, so that no weight is used by both a float32 and a half module, every
    module holding a weight tied to one of those (GPT-2's lm_head <-> wte) and every
    nn.MultiheadAttention whose out_proj is one (it reads out_proj.weight without calling it);
    with {module: why} for those last two."""
    selected = set(settings.selected(module))
    roots: list[str] = []
    for name, m in module.named_modules():
        if not _inside(name, roots) and (type(m).__name__ in settings.skip_types
                                         or (_is_layer(m) and name not in selected)):
            roots.append(name)
    tied: dict[str, str] = {}
    while True:
        owner = {id(t): f"{name}.{key}".lstrip(".") for name, m in module.named_modules()
                 if _inside(name, roots) for key, t in _own_tensors(m)}
        new = {name: f"{name}.{key} is {owner[id(t)]}".lstrip(".") for name, m in module.named_modules()
               if not _inside(name, roots) for key, t in _own_tensors(m) if id(t) in owner}
        new.update({parent: f"{parent or 'the model'} (nn.MultiheadAttention) reads {r}.weight directly"
                    for r in roots if r for parent in [r.rpartition(".")[0]] if not _inside(parent, roots)
                    and isinstance(module.get_submodule(parent), _READS_CHILDREN)})
        if not new:
            return [r for r in roots if not _inside(r, [o for o in roots if o != r])], tied
        tied.update(new)
        roots.extend(new)


def _half(module: torch.nn.Module, settings: Quantize, dtype: torch.dtype) -> dict[str, Any]:
    # Cast every module but the float32 islands, each its own tensors (_apply(recurse=False)), so
    # the islands' weights stay bit-identical (never rounded); hooks cast activations at their boundaries.
    islands, tied = _float32_islands(module, settings)
    converted = [n for n in settings.selected(module) if not _inside(n, islands)]
    if not converted:
        raise ConfigError(
            f"Quantize({settings.method!r}): every selected layer shares weights with a layer kept in "
            f"float32 ({sorted(tied.values())}), so none would be cast: such groups stay float32 together. "
            "Remove those layers from skip= (or skip_types=)."
        )
    if islands:
        cast = functools.partial(_cast_float, dtype=dtype)
        for name, m in module.named_modules():
            if not _inside(name, islands):
                m._apply(cast, recurse=False)
    else:
        module.to(dtype)
    for name in islands:
        add_cast_hooks(module.get_submodule(name), torch.float32, dtype)
    add_cast_hooks(module, dtype)
    name = "float16" if dtype == torch.float16 else "bfloat16"
    skipped = sorted(n for n, m in module.named_modules() if _is_layer(m) and _inside(n, islands))
    details = {"dtype": name, "layers_converted": len(converted), "layers_skipped": skipped,
               "kernel": f"torch {name} kernels (the model cast but for skipped layers; float32 "
                         "inputs/outputs cast at the boundaries)"}
    if tied:
        ties = "; ".join(tied[n] for n in sorted(tied))
        details["kept_float"] = {"layers": sorted(tied), "reason": f"shares weights with a skipped layer "
                                 f"({ties}): such groups stay float32 together"}
    return details


_HALF_FACTS = dict(dtype_policy="warn", layer_types=(torch.nn.Linear, *_CONVS), settings_type=HalfSettings)


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
