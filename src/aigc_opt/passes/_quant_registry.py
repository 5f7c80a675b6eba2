"""The quantization-method registry, in a leaf module: each backend module (``_quant_torch``,
``_quant_pt2e``, ``_quant_onnx``, ``_quant_bnb``...) registers its methods here with
``@quant_method(...)``, and ``quantize.py`` imports the backends, so no backend imports the pass
back (torchao's pattern: one decorator registers the handler, the entry point never changes)."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from .._registry import Registry
from ..errors import ConfigError
from ._quant_settings import CustomMethodSettings, QuantSettings

if TYPE_CHECKING:
    from ..model import Model
    from ..target import Target
    from .quantize import Quantize

__all__ = ["QuantMethod", "DtypePolicy", "QUANT_METHODS", "quant_method", "unmatched_patterns", "closest_names_hint",
           "is_quantized", "TORCHAO"]

# What happens when the target lacks a method's target_dtype (QuantMethod.dtype_policy).
DtypePolicy = Literal["refuse", "warn"]


@dataclass(frozen=True, kw_only=True)
class QuantMethod:
    """What a quantization method needs, and the function that does it."""

    name: str
    # convert(module, settings) -> details, changing ``module`` in place; or -> (new_module, details).
    convert: Callable[[torch.nn.Module, Quantize], Any]
    description: str
    # The ONNX implementation, if any: onnx(model, settings) -> (new OnnxArtifact, details).
    onnx: Callable[[Model, Quantize], tuple[Any, dict[str, Any]]] | None = None
    device_types: tuple[str, ...] = ("cpu", "cuda")
    # Where the ONNX implementation runs, when it differs from the torch one's device_types.
    onnx_device_types: tuple[str, ...] | None = None
    target_dtype: str | None = None  # the target must run this dtype natively
    # What happens when the target lacks target_dtype: "refuse", or "warn" on CPU targets
    # (the method runs, correctly but without fast kernels) and refuse elsewhere.
    dtype_policy: DtypePolicy = "refuse"
    onnx_packages: tuple[str, ...] = ("onnx", "onnxruntime")
    package: str | None = None  # optional dependency, imported lazily
    extra: str | None = None
    simulated: bool = False
    layer_types: tuple[type, ...] = (torch.nn.Linear,)  # the layers it quantizes (torch)
    # keep_float(layer) -> why the method leaves that layer float (a shape its kernel cannot take), or None.
    keep_float: Callable[[torch.nn.Module], str | None] | None = None
    # check_layers(settings, {name: layer}): refusals that depend on the selected layers (ConfigError).
    check_layers: Callable[[Quantize, dict[str, torch.nn.Module]], None] | None = None
    # The method's frozen settings class (passes/_quant_settings.py): its fields are the Quantize
    # settings it takes, its ``honoured`` says which of them each format reads. None: a method
    # registered without one, whose ``options``/``onnx_options`` say that (CustomMethodSettings).
    settings_type: type[QuantSettings] | None = None
    # The settings it honours on torch / ONNX models: from settings_type when it is given.
    options: tuple[str, ...] | None = None
    onnx_options: tuple[str, ...] | None = None
    needs_data: bool = False  # calibration batches (``data=``)
    # check(settings, target, fmt): method-specific refusals (e.g. a kernel missing on CPU).
    check: Callable[[Quantize, Target, str], None] | None = None
    # restore(module, settings, state) -> module, for methods that replace the module itself.
    restore: Callable[[torch.nn.Module, Quantize, dict[str, Any]], torch.nn.Module] | None = None
    # Keys of convert's details that restore reads: moved into the record's restore state
    # (``state_keys``: internal) or copied there and kept in the report (``shared_state_keys``).
    state_keys: tuple[str, ...] = ()
    shared_state_keys: tuple[str, ...] = ()
    takes_target: bool = False  # convert(module, settings, target=...) (e.g. to pick a quantizer)

    def __post_init__(self) -> None:
        if self.dtype_policy not in get_args(DtypePolicy):
            raise ConfigError(f"quantization method {self.name!r}: dtype_policy={self.dtype_policy!r} is not "
                              f"allowed. Allowed: {list(get_args(DtypePolicy))}.")
        if self.settings_type is None:
            object.__setattr__(self, "settings_type", CustomMethodSettings)
            for name, default in (("options", ("per_channel", "skip_types")),
                                  ("onnx_options", ("per_channel", "transformer_fusions"))):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, default)
            return
        self.settings_type.check_declaration()
        for name, fmt in (("options", "torch"), ("onnx_options", "onnx")):
            declared = self.settings_type.honoured_in(fmt)
            if getattr(self, name) is not None and set(getattr(self, name)) != set(declared):
                raise ConfigError(f"quantization method {self.name!r}: {name}={getattr(self, name)} differs from "
                                  f"{self.settings_type.__name__}.honoured[{fmt!r}] {declared}; give one of them.")
            object.__setattr__(self, name, declared)

    def honoured(self, fmt: str) -> tuple[str, ...]:
        """The settings this method reads on a model in format ``fmt`` (besides skip and the fallback's)."""
        if fmt == "torch":
            return self.options or ()
        if fmt == "onnx":
            return (self.onnx_options or ()) if self.onnx is not None else ()
        return self.settings_type.honoured_in(fmt) if self.settings_type else ()

    def takes(self) -> tuple[str, ...]:
        """The settings it honours in some format: any other is refused when Quantize is made."""
        return tuple(dict.fromkeys(n for fmt in ("torch", "onnx", "openvino") for n in self.honoured(fmt)))

    def devices_for(self, fmt: str) -> tuple[str, ...]:
        """The device types this method runs on for a model in format ``fmt``."""
        return self.onnx_device_types if fmt == "onnx" and self.onnx_device_types else self.device_types

    @property
    def formats(self) -> tuple[str, ...]:
        return ("torch", "onnx") if self.onnx is not None else ("torch",)


QUANT_METHODS: Registry[QuantMethod] = Registry("quantization method")


# The package (and the extra that installs it) behind every torchao-backed method: one fact, declared once.
TORCHAO = {"package": "torchao", "extra": "quant"}


def quant_method(name: str, **facts: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn(module, settings) -> details`` as quantization method ``name``."""

    def add(fn: Callable[..., Any]) -> Callable[..., Any]:
        QUANT_METHODS.register(name, QuantMethod(name=name, convert=fn, **facts))
        return fn

    return add


def unmatched_patterns(patterns: tuple[str, ...], names: list[str]) -> list[str]:
    """The ``skip`` patterns that match none of ``names`` (fnmatch)."""
    return [p for p in patterns if not any(fnmatch.fnmatch(name, p) for name in names)]


def closest_names_hint(unmatched: list[str], names: list[str]) -> str:
    """"; did you mean [...]?" with the names closest to the unmatched patterns, else a sample."""
    import difflib

    close = sorted({c for p in unmatched for c in difflib.get_close_matches(p, names, n=3, cutoff=0.5)})
    return f"; did you mean {close}?" if close else f"; names include {sorted(set(names))[:12]}."


def is_quantized(linear: torch.nn.Module) -> bool:
    # torchao swaps the weight for a tensor subclass (Int8Tensor); a plain Parameter means untouched.
    weight = getattr(linear, "weight", None)
    return weight is not None and type(weight) not in (torch.Tensor, torch.nn.Parameter)
