"""Fidelity: how far a candidate's outputs moved from the baseline's on the same inputs."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .._tree import flatten_tensors
from ..errors import InvalidInputError

__all__ = ["Fidelity", "FidelityAccumulator"]


@dataclass
class Fidelity:
    """Output agreement with the baseline, over every batch measured.

    Attributes:
        max_abs_error: largest absolute difference over all output tensors.
        cosine_mean / cosine_min: cosine similarity per sample (each output row flattened),
            averaged / worst over samples; for the primary (first) output.
        top1_agreement: fraction of samples whose argmax over the last dimension matches
            (meaningful for logits), for the primary output; None for 1-D outputs.
        per_output: the same numbers for every output tensor, by name.
    """

    max_abs_error: float
    cosine_mean: float
    cosine_min: float
    top1_agreement: float | None
    samples: int
    primary_output: str
    nonfinite: int = 0  # NaN/inf output values the baseline did not have
    per_output: dict[str, dict[str, float | None]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Stats:
    def __init__(self, *, top1: bool) -> None:
        self.top1 = top1
        self.max_abs = 0.0
        self.nonfinite = 0  # NaN/inf values in the candidate beyond those in the baseline
        self.cos: list[torch.Tensor] = []
        self.top1_hits = 0
        self.top1_total = 0

    def add(self, ref: torch.Tensor, out: torch.Tensor) -> None:
        ref, out = ref.detach().float().cpu(), out.detach().float().cpu()
        bad = int((~torch.isfinite(out)).sum()) - int((~torch.isfinite(ref)).sum())
        self.nonfinite += max(bad, 0)
        if ref.numel():
            diff = float((ref - out).abs().max())
            # NaN compares false with everything: max() would silently drop it.
            self.max_abs = math.nan if math.isnan(diff) or math.isnan(self.max_abs) else max(self.max_abs, diff)
        r = ref.reshape(ref.shape[0], -1) if ref.dim() > 1 else ref.reshape(1, -1)
        o = out.reshape(r.shape)
        self.cos.append(torch.nn.functional.cosine_similarity(r, o, dim=1, eps=1e-12))
        if self.top1 and ref.dim() >= 2 and ref.shape[-1] > 1:
            hits = ref.argmax(-1) == out.argmax(-1)
            self.top1_hits += int(hits.sum())
            self.top1_total += hits.numel()

    def summary(self) -> dict[str, float | None]:
        cos = torch.cat(self.cos) if self.cos else torch.ones(1)
        return {
            "max_abs_error": float("inf") if self.nonfinite else self.max_abs,
            "nonfinite": self.nonfinite,
            "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()),
            "top1_agreement": self.top1_hits / self.top1_total if self.top1_total else None,
        }


class FidelityAccumulator:
    """Collects baseline vs candidate outputs batch by batch."""

    def __init__(self, candidate_name: str, *, top1: bool = True):
        self.name = candidate_name
        self.top1 = top1
        self.stats: dict[str, _Stats] = {}
        self.samples = 0

    def add(self, reference: Any, output: Any) -> None:
        ref, out = flatten_tensors(reference), flatten_tensors(output)
        if ref.keys() != out.keys():
            raise InvalidInputError(
                f"{self.name} returns outputs {sorted(out)} but the baseline returns {sorted(ref)}; "
                "they cannot be compared. Pass output_fn= to select comparable outputs."
            )
        for key, r in ref.items():
            o = out[key]
            if r.shape != o.shape:
                raise InvalidInputError(
                    f"{self.name}: output {key!r} has shape {tuple(o.shape)} but the baseline's has "
                    f"{tuple(r.shape)}; pass output_fn= to select comparable outputs."
                )
            if not (r.is_floating_point() or o.is_floating_point()):
                continue  # integer outputs (ids, masks) are compared elsewhere, not by cosine
            self.stats.setdefault(key, _Stats(top1=self.top1)).add(r, o)
        first = next(iter(ref.values()), None)
        self.samples += int(first.shape[0]) if first is not None and first.dim() > 0 else 1

    def result(self) -> Fidelity:
        if not self.stats:
            raise InvalidInputError(f"{self.name}: no floating-point outputs to compare.")
        per = {k: s.summary() for k, s in self.stats.items()}
        primary = next(iter(per))
        maxes = [float(p["max_abs_error"]) for p in per.values()]
        return Fidelity(
            max_abs_error=math.nan if any(math.isnan(m) for m in maxes) else max(maxes),
            nonfinite=sum(int(p["nonfinite"] or 0) for p in per.values()),
            cosine_mean=float(per[primary]["cosine_mean"] or 0.0),
            cosine_min=float(per[primary]["cosine_min"] or 0.0),
            top1_agreement=per[primary]["top1_agreement"],
            samples=self.samples,
            primary_output=primary,
            per_output=per,
        )
