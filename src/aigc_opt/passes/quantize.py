"""Quantize: lower the precision of weights (and activations) with real low-precision kernels.

Methods live in a registry (``QUANT_METHODS``): each is a :class:`QuantMethod` that says which
formats, device types, target dtypes and optional package it needs, and a function that
converts a module in place (on the pass's private copy). ``check`` reads those facts; adding a
method is one function and one ``@quant_method(...)`` line.

The methods themselves live beside this file: ``_quant_torch`` (torchao int8 dynamic and
weight-only, fp8, int4), ``_quant_half`` (fp16/bf16 casts), ``_quant_pt2e`` (static int8 via torch.export),
``_quant_onnx`` (ONNX Runtime static int8 and fp16), ``_quant_bnb`` (bitsandbytes);
``_quant_auto`` picks one from the target and ``_quant_fallback`` keeps sensitive layers in
float to meet an accuracy budget.

Example:
    >>> import aigc_opt as ao, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    >>> m = ao.Model(net, example_inputs=(torch.randn(2, 16),), target="host")
    >>> q = ao.quantize(m, "int8-dynamic")
    >>> q.history[-1].details["layers_quantized"]
    2
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import logging
import typing
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .._checks import bounded, check_fields
from .._deps import require
from ..errors import ConfigError, IncompatibleTargetError, UnsupportedModelError
from ..runtime.torch_module import unwrap
from ._prune_hf import convert_conv1d, is_conv1d
from . import _quant_bnb, _quant_half, _quant_onnx, _quant_pt2e, _quant_torch  # noqa: F401  (each registers its methods)
from ._quant_registry import (
    QUANT_METHODS,
    QuantMethod,
    closest_names_hint,
    is_quantized,
    quant_method,
    unmatched_patterns,
)
from ._quant_settings import CalibrationMethod, CustomMethodSettings, QuantSettings, as_names
from .base import Pass, PassRecord, PassResult, _plain, named, register_pass, runtime_field, split_state

if TYPE_CHECKING:
    from ..model import Model
    from ..target import Target

__all__ = ["Quantize", "quantize", "QuantMethod", "QUANT_METHODS", "quant_method", "AUTO"]

log = logging.getLogger("aigc_opt")

AUTO = "auto"  # method name resolved from the target


# Settings beyond ``skip`` that a method may take: each method's settings class (passes/_quant_settings.py)
# has those it takes, and says which of them each model format honours.
OPTIONS: tuple[str, ...] = CustomMethodSettings.field_names()
CALIBRATION_METHODS: tuple[str, ...] = typing.get_args(CalibrationMethod)


@register_pass
@dataclass(frozen=True)
class Quantize(Pass):
    """Quantize a model with ``method`` (see ``ao.QUANT_METHODS.names()``, or ``"auto"``).

    Args:
        method: e.g. ``"int8-dynamic"``: int8 weights (per output channel) and int8 activations
            quantized per token at run time, computed with real int8 matmul kernels. ``"auto"``
            picks from the target and records why (``details["auto_reason"]``).
        skip: module names (fnmatch patterns such as ``"classifier"`` or ``"*.pooler.*"``) to
            leave in full precision; for ONNX models, node names or the torch module names the
            exporter recorded.
        skip_types: module class names (``"Conv2d"``, ``"BertPooler"``): layers of that type, or
            inside a module of that type, stay in full precision.
        per_channel: one weight scale per output channel (accurate) instead of one per tensor.
        symmetric: symmetric (zero point 0) or asymmetric quantization; None: the method's default.
        group_size: weight-only methods: one scale per ``group_size`` weights along the input axis.
        reuse_blocks: ONNX int4/int8 weight-only (MatMulNBits): a weight that already lies exactly on a
            llama.cpp block grid (a model loaded from a Q4_0/Q4_1/Q8_0 GGUF) keeps those blocks as they
            are instead of being rounded a second time; False requantizes every weight.
        calibration_method: static methods: ``"minmax"``, ``"entropy"`` or ``"percentile"``.
        transformer_fusions: ONNX int8-dynamic: fuse attention/LayerNorm/GELU into ONNX Runtime's
            contrib ops first, so attention is quantized too (``QAttention``). None (default): on
            when the target's ONNX Runtime provider is CPU or CUDA and ``skip`` is empty; the
            fused graph is checked against the original on the example inputs before use.
        max_drop: with ``eval_fn``: the largest allowed metric drop; layers are kept in float,
            most sensitive first, until the quantized model is within it (else FidelityError).
        verbose: show progress bars (calibration, sensitivity search).
        data: run time only: calibration batches (each a tuple, dict or tensor, as the model is
            called), needed by static methods and by the accuracy-aware fallback.
        eval_fn: run time only: ``eval_fn(model) -> float``, higher is better (e.g. accuracy).

    Which of these settings a method takes is its frozen settings class (``QuantMethod.settings_type``,
    :mod:`aigc_opt.passes._quant_settings`): a setting outside it cannot be given, and
    ``method_settings`` is the typed instance, whose ``honoured`` says what each model format reads.
    """

    accepts_compiled: ClassVar[bool] = False
    input_formats: ClassVar[tuple[str, ...]] = ("torch", "onnx", "openvino")
    # Always written to recipes; the other settings only when they differ from the default.
    _ALWAYS: ClassVar[tuple[str, ...]] = ("method", "skip", "per_channel")

    method: str = "int8-dynamic"
    _: KW_ONLY
    skip: tuple[str, ...] = ()
    per_channel: bool = True
    skip_types: tuple[str, ...] = ()
    symmetric: bool | None = None
    group_size: int | None = bounded(None, 1, 1 << 20, hint="typical: 32, 64, 128")
    reuse_blocks: bool = True
    calibration_method: CalibrationMethod = "minmax"
    transformer_fusions: bool | None = None
    max_drop: float | None = bounded(None, 0, 1e12, hint="in metric units")
    verbose: bool = True
    data: Any = runtime_field(default=None, compare=False, repr=False)
    eval_fn: Callable[[Any], float] | None = runtime_field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):
            raise ConfigError(f"Quantize: method must be a string, got {self.method!r}.")
        if self.method != AUTO:
            QUANT_METHODS.get(self.method)  # unknown method: error with the closest names
        object.__setattr__(self, "skip", as_names("Quantize", "skip", self.skip, "module-name patterns"))
        object.__setattr__(self, "skip_types", as_names("Quantize", "skip_types", self.skip_types,
                                                          "module class names"))
        check_fields(self, "Quantize")  # the field types are the rules (bools, closed sets, ranges)
        typed = None if self.method == AUTO else self._method_settings(QUANT_METHODS.get(self.method))
        object.__setattr__(self, "_method_settings_", typed)

    def _method_settings(self, spec: QuantMethod) -> QuantSettings:
        """The settings of ``spec`` as its frozen class. A setting the method honours in no format, or
        settings no one format honours together, are refused here, when the settings are made; a
        setting it honours in another format than the model's is refused by ``check``, before any work."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        given = [o for o in OPTIONS if getattr(self, o) != defaults[o]]
        unused = [o for o in given if o not in spec.takes()]
        formats = [fmt for fmt in ("torch", "onnx", "openvino")
                   if fmt in spec.formats or spec.settings_type.honoured_in(fmt)]
        takes = "; ".join(f"{fmt}: {list(spec.honoured(fmt)) or 'none'}" for fmt in formats)
        if unused:
            raise ConfigError(
                f"Quantize(method={self.method!r}) does not take {unused[0]}={getattr(self, unused[0])!r} in "
                f"any format (the options it honours besides skip, by model format: {takes}). Leave it at its "
                "default or pick another method."
            )
        if not any(set(given) <= set(spec.honoured(fmt)) for fmt in formats):
            both = " and ".join(f"{o}={getattr(self, o)!r}" for o in given)
            raise ConfigError(
                f"Quantize(method={self.method!r}): no model format honours {both} together (by model "
                f"format: {takes}); a model has one format, so give the settings of that one."
            )
        cls = spec.settings_type or CustomMethodSettings
        typed = cls(**{name: getattr(self, name) for name in cls.field_names()})
        for name in cls.field_names():  # normalized values (lists as tuples)
            object.__setattr__(self, name, getattr(typed, name))
        return typed

    @property
    def method_settings(self) -> QuantSettings:
        """The settings of the chosen method as its frozen dataclass (``Int8StaticSettings``,
        ``Int4WeightOnlySettings``... see :mod:`aigc_opt.passes._quant_settings`), whose ``honoured``
        says which of them each model format reads."""
        if self.method == AUTO:
            raise ConfigError("Quantize('auto'): the method, and so its settings class, depends on the target; "
                              "use resolve(target) (check and apply resolve it).")
        return self.__dict__["_method_settings_"]

    def config_dict(self) -> dict[str, Any]:
        full = super().config_dict()
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return {k: v for k, v in full.items() if k in self._ALWAYS or v != _plain(defaults.get(k))}

    # ------------------------------------------------------------------ which method
    def resolve(self, target: Target, fmt: str = "torch", *, decoder: bool = False) -> tuple[QuantMethod, str | None]:
        """The method to run (``"auto"`` resolved from the target, and for ``decoder``, an ONNX
        causal-LM step with its KV cache) and, for auto, why."""
        if self.method != AUTO:
            return QUANT_METHODS.get(self.method), None
        from ._quant_auto import choose_method

        name, reason = choose_method(target, fmt, decoder=decoder, calibrated=self.data is not None)
        return QUANT_METHODS.get(name), reason

    def _resolved(self, target: Target, fmt: str) -> Quantize:
        """These settings with ``"auto"`` replaced by the method it resolves to."""
        return self if self.method != AUTO else dataclasses.replace(self, method=self.resolve(target, fmt)[0].name)

    @property
    def spec(self) -> QuantMethod:
        if self.method == AUTO:
            raise ConfigError("Quantize('auto'): the method depends on the target; use resolve(target).")
        return QUANT_METHODS.get(self.method)

    def simulated(self) -> bool:
        return self.method != AUTO and self.spec.simulated

    # ------------------------------------------------------------------ checks
    def check_static(self, fmt: str, target: Target) -> None:
        if fmt == "openvino":  # NNCF's methods (passes/_quant_nncf.py)
            from ._quant_nncf import check_openvino

            return check_openvino(self._resolved(target, fmt), target)
        spec, _ = self.resolve(target, fmt)
        label = f"Quantize(method={spec.name!r})"
        if fmt not in spec.formats:
            raise UnsupportedModelError(
                f"{label} takes a model in format {' or '.join(map(repr, spec.formats))}, "
                f"but got format {fmt!r}. Quantize before the model leaves that format (e.g. before Export)."
            )
        if target.device_type not in spec.devices_for(fmt):
            usable = [n for n in QUANT_METHODS if target.device_type in QUANT_METHODS.get(n).devices_for(fmt)
                      and fmt in QUANT_METHODS.get(n).formats]
            raise IncompatibleTargetError(
                f"{label} runs on {'/'.join(spec.devices_for(fmt))} devices, but target "
                f"{target.name!r} is a {target.device_type} device. "
                + (f"Methods for it: {usable}." if usable else
                   f"No quantization method supports {target.device_type} targets yet.")
            )
        if spec.target_dtype and not target.supports_dtype(spec.target_dtype):
            if spec.dtype_policy == "warn" and target.device_type == "cpu":
                log.warning("%s: target %r has no native %s kernels (its dtypes: %s); the model will be "
                            "half the size but likely slower than fp32.", label, target.name,
                            spec.target_dtype, list(target.dtypes))
            else:
                raise IncompatibleTargetError(
                    f"{label} needs native {spec.target_dtype} on the target, but "
                    f"{target.name!r} (arch {target.arch}) lists only {list(target.dtypes)}. "
                    "Pick a method for one of those dtypes, or method='auto'."
                )
        if spec.check is not None:  # method-specific refusals first: they say the most
            spec.check(self, target, fmt)
        self._check_options(spec, fmt)
        if fmt == "onnx":
            for package in spec.onnx_packages:
                require(package, extra="onnx", purpose=f"{label} of an ONNX model")
        elif spec.package:
            require(spec.package, extra=spec.extra, purpose=label)

    def _check_options(self, spec: QuantMethod, fmt: str) -> None:
        honoured = spec.honoured(fmt)  # the method's settings class says it (QuantSettings.honoured)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for option in OPTIONS:  # an option left at its default is not used
            if getattr(self, option) != defaults[option] and option not in honoured:
                raise ConfigError(
                    f"Quantize(method={spec.name!r}) on a {fmt} model does not take "
                    f"{option}={getattr(self, option)!r}; it honours {list(honoured) or 'no options'} "
                    "(besides skip). Leave it at its default or pick another method."
                )

    def check_model(self, model: Model) -> None:
        if model.format == "openvino":
            from ._quant_nncf import check_openvino_model

            return check_openvino_model(self._resolved(model.target, model.format), model)
        spec, _ = self.resolve(model.target, model.format, decoder=_is_decoder(model))
        if self.max_drop is not None and self.eval_fn is None:
            raise ConfigError("Quantize: max_drop needs eval_fn=(model -> metric, higher is better) at run time.")
        if spec.needs_data and self.data is None:
            raise ConfigError(
                f"Quantize(method={spec.name!r}) calibrates activation ranges and needs data=: a list of "
                "batches, each given as the model is called (tuple, dict or tensor), e.g. 8-32 batches."
            )
        if model.format != "torch":
            return
        module = unwrap(model.artifact)
        # A model may say what makes calibration data poor for it (a denoiser: a single timestep).
        check_calibration = getattr(module, "check_calibration", None)
        if self.data is not None and spec.needs_data and callable(check_calibration):
            check_calibration(self.data)
        names = [name for name, _ in module.named_modules() if name]
        unmatched = unmatched_patterns(self.skip, names)
        if unmatched:
            raise ConfigError(
                f"Quantize: skip={unmatched} matches no module of {model.name}, so nothing would be skipped"
                + closest_names_hint(unmatched, names)
                + " skip takes module names as model.named_modules() gives them, or fnmatch patterns ('*.pooler*').")
        selected = self.selected(module, spec)
        if not selected:
            types = "/".join(f"nn.{t.__name__}" for t in spec.layer_types)
            kept = self.kept_float(module, spec)
            raise UnsupportedModelError(
                f"Quantize(method={spec.name!r}) found no {types} layer to quantize"
                + (f" outside skip={list(self.skip)}" if self.skip else "")
                + (f" and skip_types={list(self.skip_types)}" if self.skip_types else "")
                + (f" (left float, as its kernel cannot take them: {kept})" if kept else "")
                + "; it would return an unchanged model."
            )
        if spec.check_layers is not None:
            spec.check_layers(self, {n: module.get_submodule(n) for n in selected})

    def selected(self, module: torch.nn.Module, spec: QuantMethod | None = None) -> list[str]:
        """Names of the layers the method will quantize (skip, skip_types and ``kept_float`` applied)."""
        return [name for name, why in self._candidates(module, spec or self.spec) if why is None]

    def kept_float(self, module: torch.nn.Module, spec: QuantMethod | None = None) -> dict[str, str]:
        """Layers the method would quantize but leaves float (shapes its kernel cannot take), with why."""
        return {name: why for name, why in self._candidates(module, spec or self.spec) if why is not None}

    def _candidates(self, module: torch.nn.Module, spec: QuantMethod) -> list[tuple[str, str | None]]:
        layer_types = spec.layer_types
        skipped: list[str] = []  # modules whose type is in skip_types: they and their children stay float
        names = []
        for name, m in module.named_modules():
            if any(p == "" or name == p or name.startswith(p + ".") for p in skipped):
                continue
            if type(m).__name__ in self.skip_types:
                skipped.append(name)
                continue
            linear_like = isinstance(m, layer_types) or (torch.nn.Linear in layer_types and is_conv1d(m))
            if linear_like and not any(fnmatch.fnmatch(name, p) for p in self.skip):
                names.append((name, spec.keep_float(m) if spec.keep_float else None))
        return names

    def _selected(self, module: torch.nn.Module) -> list[str]:  # the earlier name, for custom methods
        return self.selected(module)

    # ------------------------------------------------------------------ work
    def run(self, model: Model) -> PassResult | tuple[Any, dict[str, Any]]:
        if model.format == "openvino":
            from ._quant_nncf import quantize_openvino

            spec, reason = self.resolve(model.target, model.format)
            artifact, details = quantize_openvino(model, self._resolved(model.target, model.format))
            return artifact, ({"method": spec.name, "auto_reason": reason, **details} if reason else details)
        spec, reason = self.resolve(model.target, model.format, decoder=_is_decoder(model))
        if self.eval_fn is not None:
            from ._quant_fallback import quantize_within_budget

            artifact, details = quantize_within_budget(self, spec, model)
        else:
            artifact, details = self.run_once(model, spec)
        if reason is not None:
            details = {"method": spec.name, "auto_reason": reason, **details}
        state = {"method": spec.name,
                 **split_state(details, moved=spec.state_keys, copied=(*spec.shared_state_keys, "conv1d_to_linear"))}
        kept = details.get("fallback", {}).get("kept_in_float")
        if kept:
            state["kept_in_float"] = list(kept)
        return PassResult(artifact, details, state=state)

    def run_once(self, model: Model, spec: QuantMethod, keep_float: tuple[str, ...] = ()) -> tuple[Any, dict[str, Any]]:
        """Quantize once with ``spec``, keeping the ``keep_float`` layers in full precision."""
        settings = dataclasses.replace(self, method=spec.name, skip=self.skip + tuple(keep_float))
        if model.format == "onnx":
            return spec.onnx(model, settings)  # type: ignore[misc]
        module = copy.deepcopy(unwrap(model.artifact))
        kept = settings.kept_float(module, spec)
        # GPT-2's Conv1D is a Linear with its weight stored transposed; quantizers only know nn.Linear.
        conv1d = convert_conv1d(module, [n for n in settings.selected(module, spec)
                                         if is_conv1d(module.get_submodule(n))])
        result = spec.convert(module, settings, **({"target": model.target} if spec.takes_target else {}))
        if isinstance(result, tuple):
            module, result = result
        if conv1d:
            result["conv1d_to_linear"] = conv1d
        if kept:
            result["kept_float"] = {"layers": sorted(kept), "reason": "; ".join(sorted(set(kept.values())))}
        if spec.target_dtype:
            result["native_on_target"] = model.target.supports_dtype(spec.target_dtype)
        return module, result

    def restore(self, module: Any, record: PassRecord) -> Any:
        state = record.restore_state()
        spec = QUANT_METHODS.get(state.get("method", self.method))
        kept = state.get("kept_in_float")
        if kept is None:  # a record from before restore state: the fallback report held it
            kept = state.get("fallback", {}).get("kept_in_float", ())
        settings = dataclasses.replace(self, method=spec.name, skip=self.skip + tuple(kept))
        if state.get("conv1d_to_linear"):
            convert_conv1d(unwrap(module), list(state["conv1d_to_linear"]))
        if spec.restore is not None:
            return spec.restore(unwrap(module), settings, state)
        result = spec.convert(unwrap(module), settings)
        return result[0] if isinstance(result, tuple) else module


def quantize(model: Model, method: str = "int8-dynamic", *, name: str | None = None, **settings: Any) -> Model:
    """One-line form of ``Quantize(method, **settings).apply(model)``; ``name=`` labels the result."""
    return named(Quantize(method, **settings).apply(model), name)


def _is_decoder(model: Model) -> bool:
    """An ONNX causal-LM step exported with its KV cache (what ``Model.generate`` runs)."""
    return model.format == "onnx" and getattr(model.artifact, "generation", None) is not None


_is_quantized = is_quantized  # the earlier private name
