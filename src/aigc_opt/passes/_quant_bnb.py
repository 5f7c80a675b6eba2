"""bitsandbytes methods: replace ``nn.Linear`` with ``Linear8bitLt`` (LLM.int8) or ``Linear4bit``
(NF4 / FP4). The record says on which device the kernels run (bitsandbytes >= 0.45 also has CPU
kernels; on CPU its 4-bit matmuls are slower than fp32, a memory saving only)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .._deps import require
from ..errors import IncompatibleTargetError
from .quantize import quant_method

if TYPE_CHECKING:
    from ..target import Target
    from .quantize import Quantize

__all__: list[str] = []


def _check_bnb(settings: Quantize, target: Target, fmt: str) -> None:
    bnb = require("bitsandbytes", extra="bnb", purpose=f"Quantize(method={settings.method!r})")
    if target.device_type == "cpu":
        from packaging.version import Version

        if Version(getattr(bnb, "__version__", "0")) < Version("0.45"):
            raise IncompatibleTargetError(
                f"Quantize(method={settings.method!r}) on CPU target {target.name!r} needs bitsandbytes >= 0.45 "
                f"(installed: {bnb.__version__}), the first with CPU kernels: pip install -U bitsandbytes."
            )


def _replace_linears(module: torch.nn.Module, settings: Quantize, make: Any, device: str) -> list[str]:
    names = settings.selected(module)
    for name in names:
        old = module.get_submodule(name)
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        new = make(old)
        setattr(parent, attr, new.to(device))  # .to(device) quantizes the weight
    return names


def _device(module: torch.nn.Module) -> str:
    # The device the model is on decides where bitsandbytes quantizes and runs.
    return "cuda" if torch.cuda.is_available() and any(p.is_cuda for p in module.parameters()) else "cpu"


def _bnb_int8(module: torch.nn.Module, settings: Quantize) -> dict[str, Any]:
    bnb = require("bitsandbytes", extra="bnb", purpose="Quantize('bnb-int8')")
    device = _device(module)

    def make(old: torch.nn.Linear) -> torch.nn.Module:
        new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=old.bias is not None,
                                  has_fp16_weights=False, threshold=6.0)
        new.weight = bnb.nn.Int8Params(old.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        if old.bias is not None:
            new.bias = torch.nn.Parameter(old.bias.data.clone(), requires_grad=False)
        return new

    names = _replace_linears(module, settings, make, device)
    return {"layers_quantized": len(names), "kernel_device": device, "threshold": 6.0,
            "kernel": f"bitsandbytes LLM.int8 (Linear8bitLt, int8 matmul + fp16 outliers) on {device}"}


def _bnb_4bit(quant_type: str) -> Any:
    def convert(module: torch.nn.Module, settings: Quantize) -> dict[str, Any]:
        bnb = require("bitsandbytes", extra="bnb", purpose=f"Quantize('bnb-{quant_type}')")
        device = _device(module)
        blocksize = settings.group_size or 64

        def make(old: torch.nn.Linear) -> torch.nn.Module:
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                    compute_dtype=old.weight.dtype, quant_type=quant_type)
            new.weight = bnb.nn.Params4bit(old.weight.data.clone(), requires_grad=False,
                                           quant_type=quant_type, blocksize=blocksize)
            if old.bias is not None:
                new.bias = torch.nn.Parameter(old.bias.data.clone(), requires_grad=False)
            return new

        names = _replace_linears(module, settings, make, device)
        return {"layers_quantized": len(names), "kernel_device": device, "blocksize": blocksize,
                "kernel": f"bitsandbytes Linear4bit ({quant_type}) on {device}",
                "note": "On CPU a memory saving only: 4-bit matmuls are slower than fp32 there."}

    return convert


_FACTS = dict(package="bitsandbytes", extra="bnb", check=_check_bnb, options=("skip_types",))
quant_method("bnb-int8", description="bitsandbytes LLM.int8: Linear8bitLt (int8 weights, fp16 outliers)",
             target_dtype="int8", **_FACTS)(_bnb_int8)
quant_method("bnb-nf4", description="bitsandbytes 4-bit NormalFloat weights (Linear4bit, QLoRA's NF4)",
             **{**_FACTS, "options": ("skip_types", "group_size")})(_bnb_4bit("nf4"))
quant_method("bnb-fp4", description="bitsandbytes 4-bit float weights (Linear4bit, FP4)",
             **{**_FACTS, "options": ("skip_types", "group_size")})(_bnb_4bit("fp4"))
