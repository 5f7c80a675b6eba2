"""Quantize an OpenVINO IR with NNCF (extra ``[openvino]``).

- ``int8-static``: ``nncf.quantize`` on the calibration batches (``data=``), with
  ``ModelType.TRANSFORMER`` when the graph has attention (Softmax), which makes NNCF keep the
  precision-sensitive ops in float. SmoothQuant (which NNCF's transformer recipe runs first) and
  fast bias correction are off: each costs a statistics pass over the data (a model compiled with
  extra outputs), and on MiniLM neither helped (below). With
  ``max_drop`` and ``eval_fn``: ``nncf.quantize_with_accuracy_control``, which returns quantized
  groups to float, most harmful first, until ``eval_fn`` is within ``max_drop`` of the float
  model's (absolute drop); FidelityError if even that does not get there.
- ``int8-weight-only`` / ``int4-weight-only``: ``nncf.compress_weights`` (INT8_ASYM; INT4_SYM with
  ``group_size``, default 128; NNCF keeps the embeddings and the last layer in int8).

``skip`` takes fnmatch patterns of OpenVINO node names (NNCF's ``IgnoredScope``).
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._deps import quiet_import_logs, require
from ..errors import ConfigError, IncompatibleTargetError
from ._quant_registry import QUANT_METHODS

if TYPE_CHECKING:
    from ..model import Model
    from ..target import Target
    from .quantize import Quantize

__all__ = ["ACCURACY_CONTROL", "NNCF_METHODS", "check_openvino", "check_openvino_model", "quantize_openvino"]

# Ops that mark a transformer (the torch frontend turns SDPA into one op; older graphs keep Softmax).
_ATTENTION_OPS = frozenset({"Softmax", "ScaledDotProductAttention"})

# What each NNCF method honours is its settings class's honoured["openvino"] (passes/_quant_settings.py);
# besides, max_drop (with eval_fn) is NNCF's accuracy control, which only quantize_with_accuracy_control has.
ACCURACY_CONTROL = ("int8-static",)


def check_openvino(settings: Quantize, target: Target) -> None:
    if settings.method not in NNCF_METHODS:
        raise ConfigError(f"Quantize(method={settings.method!r}) does not take an OpenVINO model; NNCF's methods "
                          f"are {sorted(NNCF_METHODS)}.")
    if target.device_type != "cpu" and not any(b in target.backends for b in ("openvino-gpu", "openvino-npu")):
        raise IncompatibleTargetError(f"Quantize on an OpenVINO model targets OpenVINO devices; target "
                                      f"{target.name!r} is a {target.device_type} device without one.")
    honoured = (*QUANT_METHODS.get(settings.method).honoured("openvino"),
                *(("max_drop",) if settings.method in ACCURACY_CONTROL else ()))
    given = settings.method_settings.given()
    if settings.max_drop is not None:
        given["max_drop"] = settings.max_drop
    for option, value in given.items():
        if option not in honoured:
            raise ConfigError(f"Quantize(method={settings.method!r}) on an OpenVINO model does not take "
                              f"{option}={value!r}; it honours {list(honoured) or 'no options'} (besides skip).")
    require("nncf", extra="openvino", purpose=f"Quantize(method={settings.method!r}) of an OpenVINO model")


def check_openvino_model(settings: Quantize, model: Model) -> None:
    if settings.eval_fn is not None and settings.max_drop is None:
        raise ConfigError("Quantize on an OpenVINO model uses eval_fn for accuracy control only: give max_drop= "
                          "too (the largest allowed drop of eval_fn's metric), or check the result with ao.compare.")
    if settings.method == "int8-static" and settings.data is None:
        raise ConfigError("Quantize(method='int8-static') calibrates activation ranges and needs data=: a list "
                          "of batches, each given as the model is called (dict or tuple), e.g. 8-32 batches.")


def _ignored(settings: Quantize) -> Any:
    if not settings.skip:
        return None
    import nncf

    return nncf.IgnoredScope(patterns=[fnmatch.translate(p) for p in settings.skip], validate=False)


def _feed(names: list[str]) -> Callable[[Any], dict[str, np.ndarray]]:
    def transform(batch: Any) -> dict[str, np.ndarray]:
        values = batch if isinstance(batch, dict) else dict(zip(names, batch if isinstance(batch, (tuple, list))
                                                                 else (batch,)))
        return {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
                for k, v in values.items() if k in names}

    return transform


def _int8_static(ov_model: Any, settings: Quantize, model: Model) -> tuple[Any, dict[str, Any]]:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    names = [p.get_any_name() for p in ov_model.inputs]
    data = list(settings.data)
    transformer = any(op.get_type_name() in _ATTENTION_OPS for op in ov_model.get_ordered_ops())
    ranges = {"minmax": RangeEstimatorParametersSet.MINMAX, "percentile": RangeEstimatorParametersSet.MEAN_QUANTILE,
              "entropy": RangeEstimatorParametersSet.MEAN_MINMAX}[settings.calibration_method]
    # Bias correction off: on MiniLM (NNCF 3.4, 5 batches) fast bias correction took 3.5-4 s of a 7-9 s
    # quantization and left every embedding's cosine to fp32 unchanged (mean 0.9918, min 0.9763 with
    # and without); measured in benchmarks/results/embed_corpus.md's prep time. SmoothQuant off (alpha
    # -1): on MiniLM it cost a statistics pass and lowered fidelity (cosine mean/min to fp32 over the
    # 400 reference sentences 0.9918/0.9763 with it, 0.9929/0.9866 without; NNCF 3.4, 2026-12-02).
    advanced = AdvancedQuantizationParameters(activations_range_estimator_params=ranges,
                                              disable_bias_correction=True,
                                              smooth_quant_alphas=AdvancedSmoothQuantParameters(matmul=-1))
    common = {"subset_size": len(data), "model_type": nncf.ModelType.TRANSFORMER if transformer else None,
              "preset": nncf.QuantizationPreset.MIXED if transformer else None, "ignored_scope": _ignored(settings)}
    details: dict[str, Any] = {"model_type": "TRANSFORMER" if transformer else "default", "smooth_quant": False,
                               "calibration_batches": len(data), "calibration_method": settings.calibration_method,
                               "bias_correction": False}
    dataset = nncf.Dataset(data, _feed(names))
    if settings.max_drop is None:
        return nncf.quantize(ov_model, dataset, advanced_parameters=advanced, **common), details
    quantized, details["accuracy_control"] = _within_drop(ov_model, dataset, settings, model, advanced, common)
    return quantized, details


def _within_drop(ov_model: Any, dataset: Any, settings: Quantize, model: Model, advanced: Any,
                 common: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``nncf.quantize_with_accuracy_control`` with ``eval_fn`` as its metric, then the drop checked."""
    import nncf

    from ..errors import FidelityError
    from ..runtime.openvino import openvino_core

    source = model.artifact

    def metric(compiled: Any) -> float:
        return float(settings.eval_fn(model.derive(source.with_compiled(compiled))))  # type: ignore[misc]

    quantized = nncf.quantize_with_accuracy_control(
        ov_model, dataset, nncf.Dataset([0]), lambda compiled, _items: (metric(compiled), None),
        max_drop=settings.max_drop, drop_type=nncf.DropType.ABSOLUTE, advanced_quantization_parameters=advanced,
        **common)
    before = metric(openvino_core().compile_model(ov_model, source.device, source.config()))
    after = metric(openvino_core().compile_model(quantized, source.device, source.config()))
    report = {"max_drop": settings.max_drop, "metric_float": before, "metric_quantized": after,
              "drop": before - after,
              "quantizers": sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ordered_ops())}
    if before - after > settings.max_drop:  # type: ignore[operator]
        raise FidelityError(f"Quantize('int8-static', max_drop={settings.max_drop}) on an OpenVINO model: NNCF's "
                            f"accuracy control reached metric {after:.6g} from {before:.6g} (drop {before - after:.4g}"
                            f" > {settings.max_drop}). Allow a larger max_drop, or keep the model in float.")
    return quantized, report



def _weights(mode_name: str) -> Callable[[Any, Quantize, Model], tuple[Any, dict[str, Any]]]:
    def compress(ov_model: Any, settings: Quantize, model: Model) -> tuple[Any, dict[str, Any]]:
        import nncf

        options: dict[str, Any] = {}
        mode = mode_name
        if mode_name.startswith("INT4"):
            mode = "INT4_ASYM" if settings.symmetric is False else "INT4_SYM"
            options["group_size"] = settings.group_size or 128
        compressed = nncf.compress_weights(ov_model, mode=getattr(nncf.CompressWeightsMode, mode),
                                           ignored_scope=_ignored(settings), **options)
        return compressed, {"mode": mode.lower(), **options}

    return compress


NNCF_METHODS: dict[str, Callable[[Any, Quantize, Model], tuple[Any, dict[str, Any]]]] = {
    "int8-static": _int8_static,
    "int8-weight-only": _weights("INT8_ASYM"),
    "int4-weight-only": _weights("INT4_SYM"),
}


def quantize_openvino(model: Model, settings: Quantize) -> tuple[Any, dict[str, Any]]:
    """Quantize the IR of ``model`` with NNCF; the new IR goes into a new work directory."""
    ov = require("openvino", extra="openvino", purpose="Quantize of an OpenVINO model")
    nncf = require("nncf", extra="openvino", purpose="Quantize of an OpenVINO model")
    from .._workdir import new_workdir
    from ..runtime.openvino import OpenVINOArtifact

    source: OpenVINOArtifact = model.artifact
    ov_model = source.ov_model().clone()  # NNCF may change the model it is given (weight compression does)
    start = time.perf_counter()
    with quiet_import_logs("nncf"):
        logging.getLogger("nncf").setLevel(logging.ERROR)
        quantized, details = NNCF_METHODS[settings.method](ov_model, settings, model)
    workdir = new_workdir("openvino")
    path = workdir / "model.xml"
    ov.save_model(quantized, str(path), compress_to_fp16=False)
    artifact = OpenVINOArtifact(path=path, output_spec=source.output_spec, device=source.device,
                                threads=source.threads, precision=source.precision, owns_dir=True)
    artifact.keep_model(quantized)
    return artifact, {"method": settings.method, "library": "nncf", "nncf": nncf.__version__,
                      "nncf_seconds": round(time.perf_counter() - start, 3), **details}
