"""Drift of a monitored model against its baseline: the alert threshold and the rule that raises it.

The numbers of each sampled call are computed by ``bench.fidelity.FidelityAccumulator`` (the ones
``ao.compare`` reports: cosine, max-abs error, top-1 agreement); this module only decides when they
moved too far. The rule reads a sliding window of the last sampled calls, so one odd input does not
raise an alert, and a model that went wrong is flagged within ``min_calls`` sampled calls.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from ._checks import check_float, check_int
from .bench.fidelity import Fidelity
from .bench.report import Report
from .errors import ConfigError

__all__ = ["DriftThreshold", "threshold_from", "drift_summary"]


@dataclass(frozen=True, kw_only=True)
class DriftThreshold:
    """When the drift of sampled calls raises an alert.

    Over the window of the last sampled calls, an alert is on when the mean cosine is below
    ``cosine``, the top-1 agreement below ``top1_agreement``, the median per-call max-abs error
    above ``max_abs_error``, or any output is NaN/inf where the baseline's is finite. None turns
    a test off. Nothing is decided before ``min_calls`` calls were sampled.

    ``DriftThreshold.from_fidelity(report.candidate().fidelity)`` derives one from what the
    benchmark measured, with room ``slack`` (3: an int8 model measured at cosine 0.9976 alerts
    below 0.9928).
    """

    cosine: float | None = 0.99
    top1_agreement: float | None = None
    max_abs_error: float | None = None
    min_calls: int = 5
    source: str = "given"

    def __post_init__(self) -> None:
        owner = "DriftThreshold"
        check_float(owner, "cosine", self.cosine, low=-1.0, high=1.0, optional=True, hint="no cosine test")
        check_float(owner, "top1_agreement", self.top1_agreement, low=0.0, high=1.0, optional=True,
                    hint="no top-1 test")
        check_float(owner, "max_abs_error", self.max_abs_error, low=0.0, high=1e30, optional=True,
                    hint="no max-abs test")
        check_int(owner, "min_calls", self.min_calls, low=1, high=1_000_000)

    @classmethod
    def from_fidelity(cls, fidelity: Fidelity, *, slack: float = 3.0, min_calls: int = 5) -> DriftThreshold:
        """Thresholds ``slack`` times as far from perfect as the benchmark measured: cosine
        ``1 - slack * (1 - cosine_mean)``, top-1 ``1 - slack * (1 - top1)``, max-abs ``slack * max_abs``
        (each never tighter than a small floor, so a bit-exact benchmark does not alert on rounding)."""
        check_float("DriftThreshold.from_fidelity", "slack", slack, low=1.0, high=1e6)
        cos = 1.0 - slack * max(1.0 - fidelity.cosine_mean, 1e-4)
        top1 = (None if fidelity.top1_agreement is None
                else max(0.0, 1.0 - slack * max(1.0 - fidelity.top1_agreement, 0.01)))
        max_abs = fidelity.max_abs_error
        max_abs = None if not math.isfinite(max_abs) else slack * max(max_abs, 1e-4)
        return cls(cosine=max(cos, -1.0), top1_agreement=top1, max_abs_error=max_abs, min_calls=min_calls,
                   source=f"benchmark fidelity x{slack:g} (cosine {fidelity.cosine_mean:.5f}"
                          + (f", top-1 {fidelity.top1_agreement:.3f}" if fidelity.top1_agreement is not None else "")
                          + f", max-abs {fidelity.max_abs_error:.3g})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def threshold_from(value: Any) -> DriftThreshold:
    """``threshold=`` as given to ``ao.monitor``: a DriftThreshold, a Report of ``ao.compare``
    (its first candidate's fidelity), a Fidelity, a float (the cosine), or None (the defaults)."""
    if value is None:
        return DriftThreshold(source="default")
    if isinstance(value, DriftThreshold):
        return value
    if isinstance(value, Report):
        if not value.candidates or value.candidates[0].fidelity is None:
            raise ConfigError("threshold= is a Report without a candidate's fidelity; give the Report of "
                              "ao.compare(baseline, model) or a DriftThreshold(...).")
        return DriftThreshold.from_fidelity(value.candidates[0].fidelity)
    if isinstance(value, Fidelity):
        return DriftThreshold.from_fidelity(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return DriftThreshold(cosine=float(value))
    raise ConfigError(f"threshold= must be a DriftThreshold, a Report of ao.compare, a Fidelity, a cosine "
                      f"(float) or None; got {type(value).__name__}.")


def _window_numbers(window: list[list[float]]) -> dict[str, float | None]:
    rows = sum(w[4] for w in window) or 1
    top1 = [(w[3], w[4]) for w in window if w[3] >= 0]
    max_abs = sorted(w[2] for w in window)
    return {
        "calls": len(window),
        "cosine_mean": sum(w[0] * w[4] for w in window) / rows if window else None,
        "cosine_min": min((w[1] for w in window), default=None),
        "max_abs_error_median": max_abs[len(max_abs) // 2] if max_abs else None,
        "top1_agreement": sum(t * n for t, n in top1) / (sum(n for _, n in top1) or 1) if top1 else None,
        "nonfinite": int(sum(w[5] for w in window)),
    }


def _reasons(numbers: dict[str, Any], threshold: DriftThreshold) -> list[str]:
    if numbers["calls"] < threshold.min_calls:
        return []
    out = []
    if numbers["nonfinite"]:
        out.append(f"{numbers['nonfinite']} output value(s) NaN/inf where the baseline's are finite")
    cos, t = numbers["cosine_mean"], threshold.cosine
    if t is not None and cos is not None and not cos >= t:
        out.append(f"mean cosine {cos:.5f} < {t:.5f}")
    top1, t = numbers["top1_agreement"], threshold.top1_agreement
    if t is not None and top1 is not None and top1 < t:
        out.append(f"top-1 agreement {top1:.3f} < {t:.3f}")
    err, t = numbers["max_abs_error_median"], threshold.max_abs_error
    if t is not None and err is not None and not err <= t:
        out.append(f"median max-abs error {err:.3g} > {t:.3g}")
    return out


def drift_summary(drift: dict[str, Any], threshold: DriftThreshold | None) -> dict[str, Any]:
    """The drift part of a snapshot: totals over every sampled call, the window's numbers, and
    the alert with its reasons (None without a baseline)."""
    rows, top1_rows = drift["rows"], drift["top1_rows"]
    window = _window_numbers(drift["window"])
    reasons = _reasons(window, threshold) if threshold is not None else []
    return {
        "sampled_calls": drift["calls"],
        "sampled_rows": rows,
        "cosine_mean": drift["cos_sum"] / rows if rows else None,
        "cosine_min": drift["cos_min"] if drift["calls"] else None,
        "max_abs_error": drift["max_abs"] if drift["calls"] else None,
        "top1_agreement": drift["top1_hits"] / top1_rows if top1_rows else None,
        "nonfinite": drift["nonfinite"],
        "baseline_errors": dict(drift["failures"]),
        "window": window,
        "alert": bool(reasons),
        "alert_reasons": reasons,
        "alerts_raised": drift["alerts"],
        "threshold": threshold.to_dict() if threshold is not None else None,
    }
