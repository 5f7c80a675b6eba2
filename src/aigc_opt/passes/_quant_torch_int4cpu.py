"""int4 weight-only quantization of torch ``nn.Linear`` layers for CPU: torch's own CPU int4 kernel
(``aten._weight_int4pack_mm_for_cpu``, the kernel behind torchao's prototype ``Int4OpaqueTensor``).

Each selected ``nn.Linear`` becomes an :class:`Int4CPULinear` holding plain buffers (packed uint8
nibbles and per-group scale/zero pairs), so the model saves as ordinary tensors (safetensors) and
``torch.compile`` passes the kernel through as an extern call. Groups run along the input features;
within a group ``w = (q - 8) * scale + zero`` with ``q`` in 0..15 (an asymmetric min/max grid,
tinygemm's layout). A llama.cpp Q4_1 block of 32 (``d * q + m``) whose values span its grid is this
same grid (``scale = d``, ``zero = m + 8d``), so a model dequantized from a Q4_1 GGUF is
re-gridded onto its own blocks at ``group_size=32``, not rounded twice (``details["grid_error"]``
says how close, in steps).

The kernel's fast path takes bfloat16 activations (measured on a 2-core AVX-512 host, 576x1536,
one row, one thread: bf16 56 us, fp32 activations 3,000 us, the fp32 ``F.linear`` 190-330 us), so
activations are cast to bfloat16 at each layer and the output back to the input's dtype; scales and
zeros are bfloat16 too (the kernel requires the activations' dtype).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..errors import ConfigError, UnsupportedModelError
from ._quant_settings import TORCH_INT4_GROUP_SIZES

__all__ = ["Int4CPULinear", "int4_cpu_weight_only", "GROUP_SIZES"]

GROUP_SIZES = TORCH_INT4_GROUP_SIZES  # what _weight_int4pack_mm_for_cpu takes (stated in _quant_settings)
N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu packs output features in blocks of 16
COMPUTE_DTYPE = torch.bfloat16


class Int4CPULinear(torch.nn.Module):
    """``nn.Linear`` with int4 weights for CPU: ``qdata`` (N, K/2) uint8 as packed by
    ``aten._convert_weight_to_int4pack_for_cpu``, ``scale_and_zero`` (K/group, N, 2) bfloat16."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qdata", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale_and_zero", torch.zeros(in_features // group_size, out_features, 2,
                                                           dtype=COMPUTE_DTYPE))
        self.bias = torch.nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, group_size: int) -> tuple[Int4CPULinear, float]:
        """The int4 layer and its largest weight error in grid steps (0.5 for a fresh rounding,
        ~0 when the weight already lay on this grid, as a Q4_1 GGUF's do)."""
        weight = linear.weight.detach().float().cpu()
        n, k = weight.shape
        layer = cls(k, n, group_size, linear.bias is not None)
        groups = weight.reshape(n, k // group_size, group_size)
        lo, hi = groups.amin(-1), groups.amax(-1)
        # scale and zero rounded to the kernel's dtype first, so q is chosen against what the kernel uses
        scale = ((hi - lo) / 15).clamp(min=1e-6).to(COMPUTE_DTYPE)
        zero = (lo + 8 * scale.float()).to(COMPUTE_DTYPE)
        q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
        recon = (q - 8) * scale.float()[..., None] + zero.float()[..., None]
        error = float(((recon - groups).abs() / scale.float()[..., None]).max())
        layer.qdata.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k).to(torch.int32), 1))
        layer.scale_and_zero.copy_(torch.stack([scale, zero], -1).transpose(0, 1))
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach().float())
        return layer, error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(COMPUTE_DTYPE), self.qdata,
                                                       self.group_size, self.scale_and_zero)
        y = y.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}, kernel=aten._weight_int4pack_mm_for_cpu")


def _check(module: torch.nn.Module, names: list[str], group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"int4 weight-only on CPU: group_size={group_size!r} has no CPU int4 kernel; use one of "
                          f"{GROUP_SIZES} (32 is llama.cpp's block).")
    for name in names:
        layer = module.get_submodule(name)
        if not isinstance(layer, torch.nn.Linear):
            raise UnsupportedModelError(f"int4 weight-only on CPU quantizes nn.Linear layers; {name!r} is a "
                                        f"{type(layer).__name__}. Leave it out (skip=[{name!r}]).")
        if layer.weight.device.type != "cpu":
            raise UnsupportedModelError(f"int4 weight-only on CPU: layer {name!r} is on {layer.weight.device}; "
                                        "move the model to the CPU first (model.to('cpu')).")
    bad = [f"{n} (in_features={module.get_submodule(n).in_features})" for n in names
           if module.get_submodule(n).in_features % group_size]
    if bad:
        raise ConfigError(f"int4 weight-only on CPU: group_size={group_size} does not divide the input width of "
                          f"{', '.join(bad[:3])}{' and more' if len(bad) > 3 else ''}; weight groups run along the "
                          "input features. Use a group_size that divides them, or skip= those layers.")


def int4_cpu_weight_only(module: torch.nn.Module, group_size: int = 32,
                         layers: Iterable[str] | None = None) -> dict[str, Any]:
    """Replace ``layers`` (default: every ``nn.Linear``) of ``module`` in place by :class:`Int4CPULinear`
    and return the record's details. A weight tied to another module (a tied ``lm_head``) is copied:
    the other module keeps its float weight. Raises ``ConfigError`` (group size) or
    ``UnsupportedModelError`` (not a Linear, not on CPU) before changing anything."""
    names = [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)] if layers is None else list(layers)
    if not names:
        raise UnsupportedModelError("int4 weight-only on CPU: the model has no nn.Linear layer to quantize.")
    _check(module, names, group_size)
    left = [n for n in names if module.get_submodule(n).out_features % N_MULTIPLE]
    names = [n for n in names if n not in left]
    if not names:
        raise UnsupportedModelError(
            f"int4 weight-only on CPU: no selected layer has a multiple of {N_MULTIPLE} output features (the CPU "
            f"kernel's packing needs it): {left[:3]}. Use int8-weight-only for this model.")
    errors: dict[str, float] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        layer, errors[name] = Int4CPULinear.from_linear(getattr(parent, child), group_size)
        setattr(parent, child, layer)
    worst = max(errors, key=errors.__getitem__)
    on_grid = sum(e < 0.15 for e in errors.values())  # the rest of the error is bf16 rounding of scale and zero
    return {"layers_quantized": len(names), "group_size": group_size, "device": "cpu",
            "activations": "bfloat16 inside each int4 layer (cast in and out)",
            "grid_error": {"max_steps": round(errors[worst], 4), "layer": worst,
                           "layers_already_on_grid": on_grid},
            **({"layers_left_float": {"layers": left, "reason": f"out_features not a multiple of {N_MULTIPLE} "
                                      "(the CPU int4 kernel's packing)"}} if left else {}),
            "kernel": "aten._weight_int4pack_mm_for_cpu (int4 x bf16, per-group scale and zero)"}
