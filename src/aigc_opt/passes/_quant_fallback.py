"""Accuracy-aware quantization: quantize, evaluate, and if the metric dropped more than
``max_drop``, keep the most sensitive layers in float until it is within budget.

Sensitivity of a layer = metric drop when only that layer is quantized. Layers are then kept in
float most sensitive first; the number kept is found by bisection (assuming the drop shrinks as
more layers stay float), so the search costs n + log2(n) quantize-and-evaluate rounds.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .._progress import progress_bar
from ..errors import ConfigError, FidelityError
from ..runtime.torch_module import unwrap

if TYPE_CHECKING:
    from ..model import Model
    from .quantize import QuantMethod, Quantize

__all__ = ["quantize_within_budget"]

log = logging.getLogger("aigc_opt")


def _metric(settings: Quantize, model: Model) -> float:
    value = settings.eval_fn(model)  # type: ignore[misc]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"Quantize: eval_fn must return a number (higher is better), got {value!r}.") from None


def quantize_within_budget(settings: Quantize, spec: QuantMethod, model: Model) -> tuple[Any, dict[str, Any]]:
    base = _metric(settings, model)
    trials: dict[int, tuple[Any, dict[str, Any], float, tuple[str, ...]]] = {}

    def trial(keep: tuple[str, ...]) -> tuple[Any, dict[str, Any], float]:
        artifact, details = settings.run_once(model, spec, keep_float=keep)
        return artifact, details, _metric(settings, model.derive(artifact))

    artifact, details, metric = trial(())
    info: dict[str, Any] = {"metric_float": base, "metric_quantized": metric, "drop": base - metric,
                            "max_drop": settings.max_drop, "kept_in_float": []}
    if settings.max_drop is None or base - metric <= settings.max_drop:
        return artifact, {**details, "fallback": info}
    if model.format != "torch":
        raise FidelityError(
            f"Quantize(method={spec.name!r}): metric dropped {base - metric:.4g} (> max_drop={settings.max_drop}) "
            "and the per-layer fallback works on torch models only: quantize before Export, or add skip=."
        )
    layers = settings.selected(unwrap(model.artifact), spec)
    trials[0] = (artifact, details, metric, ())
    sensitivity = _sensitivity(layers, lambda others: base - trial(others)[2], base - metric, settings.verbose)
    order = sorted(layers, key=lambda n: -sensitivity[n])

    def run_k(k: int) -> float:
        if k not in trials:
            keep = tuple(order[:k])
            trials[k] = (*trial(keep), keep)
        return base - trials[k][2]

    lo, hi = 1, len(layers) - 1  # keeping all n in float would be no quantization at all
    if hi < lo or run_k(hi) > settings.max_drop:
        raise _no_fit(settings, spec, model, base, trials)
    while lo < hi:
        mid = (lo + hi) // 2
        if run_k(mid) <= settings.max_drop:
            hi = mid
        else:
            lo = mid + 1
    artifact, details, metric, keep = trials[lo]
    info.update(metric_quantized=metric, drop=base - metric, kept_in_float=list(keep),
                metric_fully_quantized=trials[0][2],
                sensitivity={k: round(v, 6) for k, v in sorted(sensitivity.items(), key=lambda kv: -kv[1])},
                trials=len(trials) + len(layers))
    log.info("Quantize(%s): kept %s in float to stay within max_drop=%s (drop %.4g)", spec.name, list(keep),
             settings.max_drop, base - metric)
    return artifact, {**details, "fallback": info}


def _sensitivity(layers: list[str], drop_keeping: Any, full_drop: float, verbose: bool | None) -> dict[str, float]:
    """Each layer's drop when it alone is quantized (every other layer kept in float)."""
    bar = progress_bar(len(layers), desc="layer sensitivity", unit="layer", verbose=verbose)
    sensitivity: dict[str, float] = {}
    try:
        for layer in layers:
            others = tuple(n for n in layers if n != layer)
            sensitivity[layer] = drop_keeping(others) if others else full_drop
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return sensitivity


def _no_fit(settings: Quantize, spec: QuantMethod, model: Model, base: float,
            trials: dict[int, tuple[Any, dict[str, Any], float, tuple[str, ...]]]) -> FidelityError:
    """The error when no set of float layers meets max_drop, carrying the best trial in ``.best``."""
    best_k = min(trials, key=lambda k: base - trials[k][2])
    art, det, met, keep = trials[best_k]
    error = FidelityError(
        f"Quantize(method={spec.name!r}): no choice of float layers meets max_drop={settings.max_drop}: "
        f"the float metric is {base:.4g}; the best quantized one {met:.4g} (drop {base - met:.4g}) keeps "
        f"{list(keep)} in float. Raise max_drop, give more calibration data, or try another method."
    )
    error.best = {"artifact": art, "details": det, "metric": met, "drop": base - met,  # type: ignore[attr-defined]
                  "kept_in_float": list(keep), "metric_float": base, "model": model.derive(art)}
    return error
