"""bitsandbytes methods: replace ``nn.Linear`` with ``Linear8bitLt`` (LLM.int8) or ``Linear4bit``
(NF4 / FP4). The record says on which device the kernels run (bitsandbytes >= 0.45 also has CPU
kernels; on CPU its 4-bit matmuls are slower than fp32, a memory saving only)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .._deps import require
from ..errors import IncompatibleTargetError, UnsupportedModelError
from ._quant_registry import quant_method
from ._quant_settings import Bnb4BitSettings, BnbInt8Settings

if TYPE_CHECKING:
    from ..target import Target
    from .quantize import Quantize

__all__: list[str] = []


def _check_bnb(settings: Quantize, target: Target, fmt: str) -> None:
    # group_size: a bitsandbytes block size (BnbBlockSize), refused when the settings are made.
    bnb = require("bitsandbytes", extra="bnb", purpose=f"Quantize(method={settings.method!r})")
    if target.device_type == "cpu":
        from packaging.version import Version

        if Version(getattr(bnb, "__version__", "0")) < Version("0.45"):
            raise IncompatibleTargetError(
                f"Quantize(method={settings.method!r}) on CPU target {target.name!r} needs bitsandbytes >= 0.45 "
                f"(installed: {bnb.__version__}), the first with CPU kernels: pip install -U bitsandbytes."
            )


def _replace_linears(module: torch.nn.Module, names: list[str], make: Any, device: str | None = None) -> list[str]:
    for name in names:
        old = module.get_submodule(name)
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        new = make(old).train(old.training)  # a fresh module is in training mode; bnb's kernels differ
        setattr(parent, attr, new.to(device) if device else new)  # .to(device) quantizes the weight
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

    names = _replace_linears(module, settings.selected(module), make, device)
    return {"layers_quantized": len(names), "layers": names, "kernel_device": device, "threshold": 6.0,
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

        names = settings.selected(module)
        narrow: list[str] = []
        if device == "cpu":
            # bitsandbytes' CPU inference path repacks weights in blocks (input features per
            # quantization block, output features per 32) and fails on layers that don't divide: keep
            # those float.
            narrow = [n for n in names if module.get_submodule(n).in_features % blocksize
                      or module.get_submodule(n).out_features % 32]
            names = [n for n in names if n not in narrow]
            if not names:
                raise UnsupportedModelError(
                    f"Quantize('bnb-{quant_type}') on CPU needs Linear layers whose input width is a multiple "
                    f"of the block size {blocksize} and output width a multiple of 32; none qualifies ({narrow}). "
                    "Pass a smaller group_size (e.g. 32 or 16), or use 'int8-weight-only'."
                )
        names = _replace_linears(module, names, make, device)
        details = {"layers_quantized": len(names), "layers": names, "kernel_device": device,
                   "blocksize": blocksize, "kernel": f"bitsandbytes Linear4bit ({quant_type}) on {device}",
                   "note": "On CPU a memory saving only: 4-bit matmuls are slower than fp32 there."}
        if narrow:
            details["kept_float"] = {"layers": narrow, "reason": f"input width not a multiple of {blocksize} or output width not of 32 (CPU kernel)"}
        return details

    return convert


def _restore_int8(module: torch.nn.Module, settings: Quantize, state: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the Linear8bitLt layers so a saved state dict (int8 weight + SCB scales) loads.

    bitsandbytes refuses to load a quantized checkpoint into an unquantized layer, and
    ``load_state_dict(assign=True)`` would replace its Int8Params with a plain tensor: a pre-hook
    turns the saved weight and scales back into one Int8Params first.
    """
    bnb = require("bitsandbytes", extra="bnb", purpose="loading a bnb-int8 model")

    def make(old: torch.nn.Linear) -> torch.nn.Module:
        new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=old.bias is not None,
                                  has_fp16_weights=False, threshold=state.get("threshold", 6.0))

        def hook(state: dict[str, Any], prefix: str, *args: Any) -> None:
            if prefix + "SCB" in state:
                weight = state[prefix + "weight"]  # CB: the int8 matrix the first forward moves into .state
                state[prefix + "weight"] = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False,
                                                             CB=weight, SCB=state.pop(prefix + "SCB"))
                state.pop(prefix + "weight_format", None)

        new._register_load_state_dict_pre_hook(hook)
        return new

    _replace_linears(module, state.get("layers") or settings.selected(module), make)
    return module


def _restore_4bit(module: torch.nn.Module, settings: Quantize, state: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the Linear4bit layers; a pre-hook turns the saved packed weight and its quant-state
    tensors into a Params4bit (``Params4bit.from_prequantized``), as transformers does."""
    bnb = require("bitsandbytes", extra="bnb", purpose=f"loading a {settings.method} model")
    device = state.get("kernel_device", "cpu")
    quant_type = settings.method.removeprefix("bnb-")

    def make(old: torch.nn.Linear) -> torch.nn.Module:
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                compute_dtype=old.weight.dtype, quant_type=quant_type)
        # quantize a placeholder so the parameter has the packed shape the saved one is checked against
        new.weight = bnb.nn.Params4bit(torch.zeros(old.out_features, old.in_features, dtype=old.weight.dtype),
                                       requires_grad=False, quant_type=quant_type,
                                       blocksize=state.get("blocksize", 64)).to(device)

        def hook(state: dict[str, Any], prefix: str, *args: Any) -> None:
            stats_prefix = prefix + "weight."
            stats = {k[len(stats_prefix):]: state.pop(k) for k in list(state) if k.startswith(stats_prefix)}
            if stats:
                state[prefix + "weight"] = bnb.nn.Params4bit.from_prequantized(
                    state[prefix + "weight"], stats, requires_grad=False, device=device)

        new._register_load_state_dict_pre_hook(hook)
        return new

    _replace_linears(module, state.get("layers") or settings.selected(module), make)
    return module


_FACTS = dict(package="bitsandbytes", extra="bnb", check=_check_bnb,
              shared_state_keys=("layers", "kernel_device", "threshold", "blocksize"))
quant_method("bnb-int8", description="bitsandbytes LLM.int8: Linear8bitLt (int8 weights, fp16 outliers)",
             target_dtype="int8", restore=_restore_int8, settings_type=BnbInt8Settings, **_FACTS)(_bnb_int8)
quant_method("bnb-nf4", description="bitsandbytes 4-bit NormalFloat weights (Linear4bit, QLoRA's NF4)",
             restore=_restore_4bit, settings_type=Bnb4BitSettings, **_FACTS)(_bnb_4bit("nf4"))
quant_method("bnb-fp4", description="bitsandbytes 4-bit float weights (Linear4bit, FP4)",
             restore=_restore_4bit, settings_type=Bnb4BitSettings, **_FACTS)(_bnb_4bit("fp4"))
