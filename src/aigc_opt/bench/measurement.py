"""Measurement: raw latency samples of one model plus the facts measured beside them.

Like ``torch.utils.benchmark.Measurement`` it keeps every sample and derives statistics on
demand; it warns when the spread is large instead of hiding it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = ["Measurement", "median_ci", "ratio_ci", "HIGH_SPREAD"]

# Interquartile range above this fraction of the median is flagged as noisy.
HIGH_SPREAD = 0.25


def median_ci(samples: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median from order statistics.

    Latency samples are skewed (a long right tail), so no normal approximation is assumed:
    the ranks come from the binomial(n, 1/2) distribution of how many samples fall below
    the true median. With fewer than 6 samples no 95% interval exists; [min, max] is returned
    (its coverage is lower: 75% for n=3).
    """
    x = np.sort(np.asarray(samples, dtype=float))
    n = len(x)
    if n < 6:
        return float(x[0]), float(x[-1])
    from math import comb

    alpha = 1 - confidence
    # Largest k with P(Binomial(n, .5) < k) <= alpha/2; interval is [x_(k), x_(n-k+1)] (1-based).
    cdf, k = 0.0, 0
    while True:
        nxt = cdf + comb(n, k) / 2**n
        if nxt > alpha / 2:
            break
        cdf, k = nxt, k + 1
    k = max(k, 1)
    return float(x[k - 1]), float(x[n - k])


def ratio_ci(baseline: np.ndarray, candidate: np.ndarray, confidence: float = 0.95,
             resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Ratio of medians (candidate / baseline) with a paired bootstrap interval.

    Samples are paired by round (they were measured interleaved), so rounds are resampled
    together and noise that hit both models cancels in the ratio.
    """
    b, c = np.asarray(baseline, float), np.asarray(candidate, float)
    n = min(len(b), len(c))
    b, c = b[:n], c[:n]
    point = float(np.median(c) / np.median(b))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    ratios = np.median(c[idx], axis=1) / np.median(b[idx], axis=1)
    lo, hi = np.quantile(ratios, [(1 - confidence) / 2, 1 - (1 - confidence) / 2])
    return point, float(lo), float(hi)


@dataclass
class Measurement:
    """Latency samples (seconds per batch) of one model and the facts measured with them."""

    name: str
    samples: list[float]
    batch_size: float  # samples per call (the mean when batches differ in size)
    device: str
    num_threads: int
    target: str = "host"
    memory_bytes: int | None = None  # weights and buffers in memory
    size_bytes: int | None = None  # weights on disk
    num_parameters: int | None = None
    peak_memory_bytes: int | None = None  # peak extra memory while running one batch
    peak_rss_bytes: int | None = None  # the process's peak resident memory during one batch (CPU)
    flops: int | None = None  # per batch, from torch.utils.flop_counter (None if not countable)
    target_peak_tflops: float | None = None
    peak_source: str | None = None  # "spec sheet", "measured on this machine", ...
    stop_reason: str = ""  # why measuring stopped (fixed rounds, stable, time budget)
    simulated: bool = False
    passes: list[str] = field(default_factory=list)

    @property
    def _x(self) -> np.ndarray:
        return np.asarray(self.samples, dtype=float)

    @property
    def median(self) -> float:
        return float(np.median(self._x))

    def percentile(self, q: float) -> float:
        return float(np.percentile(self._x, q))

    @property
    def p90(self) -> float:
        return self.percentile(90)

    @property
    def p99(self) -> float:
        return self.percentile(99)

    @property
    def mean(self) -> float:
        return float(self._x.mean())

    @property
    def mean_ci95(self) -> tuple[float, float]:
        n = len(self._x)
        if n < 2:
            return self.mean, self.mean
        half = 1.96 * float(self._x.std(ddof=1)) / math.sqrt(n)
        return self.mean - half, self.mean + half

    @property
    def median_ci95(self) -> tuple[float, float]:
        return median_ci(self._x)

    @property
    def iqr(self) -> float:
        q1, q3 = np.percentile(self._x, [25, 75])
        return float(q3 - q1)

    @property
    def noisy(self) -> bool:
        return self.iqr > HIGH_SPREAD * self.median

    @property
    def outliers(self) -> int:
        """Samples above Q3 + 1.5 IQR (Tukey's fence): reported, never dropped."""
        q1, q3 = np.percentile(self._x, [25, 75])
        return int((self._x > q3 + 1.5 * (q3 - q1)).sum())

    @property
    def bytes_moved_estimate(self) -> int | None:
        """Weights read once plus the peak activation memory: a lower bound on traffic."""
        if self.memory_bytes is None:
            return None
        return self.memory_bytes + (self.peak_memory_bytes or 0)

    @property
    def arithmetic_intensity(self) -> float | None:
        """FLOPs per byte moved (estimate): low values mean memory-bound, high compute-bound."""
        moved = self.bytes_moved_estimate
        return self.flops / moved if self.flops and moved else None

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch_size / self.median

    @property
    def achieved_tflops(self) -> float | None:
        return self.flops / self.median / 1e12 if self.flops else None

    @property
    def roofline_fraction(self) -> float | None:
        """Achieved FLOP/s (counted in the model's eager fp32 form) as a fraction of the
        target's fp32 peak; None when either is unknown."""
        achieved = self.achieved_tflops
        return achieved / self.target_peak_tflops if achieved and self.target_peak_tflops else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(
            median=self.median, p90=self.p90, p99=self.p99, mean=self.mean,
            mean_ci95=list(self.mean_ci95), median_ci95=list(self.median_ci95), iqr=self.iqr,
            throughput=self.throughput, achieved_tflops=self.achieved_tflops,
            roofline_fraction=self.roofline_fraction, noisy=self.noisy, outliers=self.outliers,
            bytes_moved_estimate=self.bytes_moved_estimate, arithmetic_intensity=self.arithmetic_intensity,
        )
        return out

    def __str__(self) -> str:
        lo, hi = self.median_ci95
        return (f"{self.name}: median {self.median * 1e3:.3f} ms [95% CI {lo * 1e3:.3f}, {hi * 1e3:.3f}], "
                f"p90 {self.p90 * 1e3:.3f} ms, {self.throughput:.1f} samples/s, n={len(self.samples)}"
                + (" (noisy: IQR > 25% of median)" if self.noisy else ""))
