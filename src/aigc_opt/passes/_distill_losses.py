"""Distillation losses and the student wrapper: output KD, feature KD with learned projections,
and the checks that say, before training, when teacher and student outputs cannot be compared."""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .._tree import flatten_tensors, split_inputs
from ..errors import ConfigError, UnsupportedModelError

__all__ = ["OUTPUT_LOSSES", "FEATURE_LOSSES", "OutputLoss", "FeatureLoss", "main_output", "kd_output_loss", "feature_loss",
           "FeatureTap", "Trainee", "check_comparable", "suggest_pairs", "run_module"]

OutputLoss = Literal["kl", "mse", "cosine", "none"]
FeatureLoss = Literal["mse", "cosine"]
OUTPUT_LOSSES: tuple[str, ...] = typing.get_args(OutputLoss)
FEATURE_LOSSES: tuple[str, ...] = typing.get_args(FeatureLoss)


def run_module(module: nn.Module, inputs: Any) -> Any:
    args, kwargs = split_inputs(inputs)
    return module(*args, **kwargs)


def main_output(outputs: Any) -> torch.Tensor:
    """The tensor compared by output KD: ``logits`` when there is one, else the first tensor."""
    flat = flatten_tensors(outputs)
    if not flat:
        raise UnsupportedModelError("Distill: the model returned no tensor to distill on.")
    for key in ("logits", "output", "0", "last_hidden_state"):
        if key in flat:
            return flat[key]
    return next(iter(flat.values()))


def kd_output_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on softened distributions (scaled by T^2), or MSE / 1 - cosine."""
    s, t = student.float(), teacher.float()
    if kind == "kl":
        s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        return F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                        reduction="batchmean", log_target=True) * temperature ** 2
    return feature_loss(kind, s, t)


def feature_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(student.float(), teacher.float())
    return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()


def _first_tensor(out: Any) -> torch.Tensor | None:
    flat = flatten_tensors(out)
    return next(iter(flat.values()), None)


class FeatureTap:
    """Forward hooks that keep the output of named submodules during one forward."""

    def __init__(self, module: nn.Module, names: Sequence[str], who: str):
        modules = dict(module.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            from ..errors import closest

            hints = {n: closest(n, [m for m in modules if m]) for n in missing}
            raise ConfigError(f"Distill: feature_layers name {who} module(s) {missing} that do not exist. "
                              f"Closest names: {hints}.")
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
            self.values[name] = _first_tensor(out)  # type: ignore[assignment]
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


class Trainee(nn.Module):
    """The student plus the projections that map its (narrower) features to the teacher's widths.
    ``forward`` returns ``(outputs, projected features)`` so DDP/FSDP see every trained weight."""

    def __init__(self, student: nn.Module, pairs: Sequence[tuple[str, str]], widths: dict[str, tuple[int, int]]):
        super().__init__()
        self.student = student
        self.pairs = list(pairs)
        self.proj = nn.ModuleDict({
            _key(s): nn.Linear(ws, wt, bias=False) for s, _t in self.pairs
            for ws, wt in [widths[s]] if ws != wt
        })
        self.tap = FeatureTap(student, [s for s, _ in self.pairs], "student") if self.pairs else None

    def forward(self, inputs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        if self.tap is not None:
            self.tap.values.clear()
        out = run_module(self.student, inputs)
        feats = {}
        for s, _t in self.pairs:
            value = self.tap.values[s]  # type: ignore[union-attr]
            feats[s] = self.proj[_key(s)](value) if _key(s) in self.proj else value
        return out, feats


def _key(name: str) -> str:
    return name.replace(".", "__") or "root"


def check_comparable(output_loss: str, s_out: Any, t_out: Any, s_feats: dict[str, torch.Tensor],
                     t_feats: dict[str, torch.Tensor], pairs: Sequence[tuple[str, str]],
                     suggest: Callable[[], str]) -> dict[str, tuple[int, int]]:
    """Refuse outputs or features that cannot be compared; return each pair's (student, teacher) width."""
    if output_loss != "none":
        s, t = main_output(s_out), main_output(t_out)
        if s.shape != t.shape:
            raise UnsupportedModelError(
                f"Distill: student output {tuple(s.shape)} and teacher output {tuple(t.shape)} cannot be "
                f"compared (output_loss={output_loss!r}). Distill on matching layers instead, "
                f"e.g. output_loss='none', feature_layers={suggest()}.")
    widths = {}
    for sn, tn in pairs:
        s, t = s_feats.get(sn), t_feats.get(tn)
        if s is None or t is None:
            raise UnsupportedModelError(f"Distill: feature pair ({sn!r}, {tn!r}) produced no tensor in one "
                                        "forward pass; name modules that run and return a tensor.")
        if s.shape[:-1] != t.shape[:-1]:
            raise UnsupportedModelError(
                f"Distill: feature pair ({sn!r}, {tn!r}) has student shape {tuple(s.shape)} and teacher shape "
                f"{tuple(t.shape)}; only the last (width) dimension may differ (a projection is learned "
                f"for it). Layers whose shapes match: {suggest()}.")
        widths[sn] = (int(s.shape[-1]), int(t.shape[-1]))
    return widths


def suggest_pairs(student: nn.Module, teacher: nn.Module, inputs: Any, limit: int = 4) -> list[tuple[str, str]]:
    """Same-named leaf modules of student and teacher whose outputs agree in all but the width."""
    def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
        seen: dict[str, tuple[int, ...]] = {}
        hooks = []
        for name, m in module.named_modules():
            if name and not list(m.children()):
                def hook(_m: Any, _i: Any, out: Any, name: str = name) -> None:
                    t = _first_tensor(out)
                    if t is not None:
                        seen[name] = tuple(t.shape)
                hooks.append(m.register_forward_hook(hook))
        try:
            with torch.no_grad():
                run_module(module, inputs)
        finally:
            for h in hooks:
                h.remove()
        return seen

    try:
        s, t = shapes(student), shapes(teacher)
    except Exception:  # a suggestion must never hide the real error
        return []
    pairs = [(n, n) for n in s if n in t and s[n][:-1] == t[n][:-1]]
    return pairs[-limit:]
