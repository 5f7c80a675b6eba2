"""Prune: remove weights, either whole channels / neurons / attention heads or single weights.

Three methods, chosen by the settings (``PRUNE_METHODS``):

- ``structured`` (default): dependency-aware channel pruning with Torch-Pruning (extra
  ``[prune]``). Layers really shrink, so the model is smaller and faster on any hardware. In
  Hugging Face transformers (BERT family, GPT-2) whole attention heads and FFN neurons are removed
  and the attention modules' head counts rewritten (``_prune_hf``). The hidden (residual) width
  is kept: every ``nn.Embedding`` and every layer that produces a model output is left alone
  (pruning BERT's hidden width breaks its untraced pooler; Torch-Pruning 1.6.1 gives no error).
  The Torch-Pruning driver lives in ``_prune_structured``.
- ``unstructured``: the smallest-magnitude weights are set to zero for good. Dense kernels
  multiply by those zeros anyway, so there is no speed gain; the record says ``simulated``.
- ``n:m`` (``pattern="2:4"``): in every group of M consecutive input weights, the M-N smallest are
  zeroed. Sparse tensor cores (targets with ``sparse_2_4``, model on that GPU) run it with torch's
  semi-structured sparse kernels; elsewhere it is only a mask, labelled ``simulated``.

Example:
    >>> import aigc_opt as ao, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    >>> m = ao.Model(net.eval(), example_inputs=(torch.randn(2, 16),), target="host")
    >>> p = prune(m, 0.5, round_to=1)          # needs aigc-opt[prune]
    >>> p.artifact[0].out_features, p.artifact[2].in_features, p.history[-1].simulated
    (32, 32, False)
"""

from __future__ import annotations

import copy
import fnmatch
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from .._deps import require
from .._registry import Registry
from .._tree import map_tensors, split_inputs
from .._checks import check_int
from ..errors import ConfigError, UnsupportedModelError
from ..runtime.torch_module import unwrap
from . import _prune_hf as hf
from ._prune_rules import IMPORTANCES, STRUCTURE_RULES, default_round_to
from ._prune_structure import replay_structure
from ._prune_structured import _run_structured
from .base import Pass, PassRecord, PassResult, named, register_pass, runtime_field, split_state, validate_choice

if TYPE_CHECKING:
    from ..model import Model
    from ..target import Target

__all__ = ["Prune", "prune", "PRUNE_METHODS", "IMPORTANCES", "STRUCTURE_RULES", "DEFAULT_IGNORE", "default_round_to",
           "pruning_table"]

log = logging.getLogger("aigc_opt")

# Output heads and classifiers: left alone unless ``ignore=`` says otherwise. Layers whose
# channels reach a model output are found from the traced graph as well (structured pruning).
DEFAULT_IGNORE: tuple[str, ...] = ("*classifier*", "*lm_head", "*pooler*", "head", "*.head", "*score",
                                   "*qa_outputs")

# importance name -> builder of the Torch-Pruning importance object (given the torch_pruning module)


@dataclass(frozen=True, kw_only=True)
class PruneMethod:
    name: str
    run: Callable[[nn.Module, Prune, Model], dict[str, Any]]
    restore: Callable[[nn.Module, dict[str, Any]], None]
    simulated: bool
    package: str | None = None
    # Keys of run's details that restore reads: moved into the record's restore state
    # (``state_keys``: internal) or copied there and kept in the report (``shared_state_keys``).
    state_keys: tuple[str, ...] = ()
    shared_state_keys: tuple[str, ...] = ()


PRUNE_METHODS: Registry[PruneMethod] = Registry("pruning method")


@register_pass
@dataclass(frozen=True)
class Prune(Pass):
    """Prune ``ratio`` of the channels (structured) or weights (unstructured) of a model.

    Args:
        ratio: fraction to remove, in (0, 1): of each layer's channels / neurons and attention heads
            (structured), or of its weights (unstructured). Not used with ``pattern``.
        structured: remove whole channels (real speed) or single weights (``False``: masks only).
        pattern: ``"N:M"`` semi-structured sparsity such as ``"2:4"`` (then ``ratio`` is 1 - N/M).
        importance: ``"l1"`` / ``"l2"`` weight magnitude, ``"taylor"`` (|weight x gradient| on
            ``data``), ``"random"`` (a baseline; seeded, so reproducible).
        global_pruning: rank channels across all layers instead of within each layer.
        ignore: module-name patterns (fnmatch) to leave alone; default: heads and classifiers.
        round_to: kept channels are a multiple of this (default from the target: 16 on tensor-core
            GPUs, the fp32 SIMD lanes on CPUs); 1 for none.
        iterative_steps: reach ``ratio`` in this many pruning steps (importance re-estimated).
        prune_heads: remove whole attention heads in transformers (else attention is left alone).
        data: for ``importance="taylor"``: batches as the model takes them, or ``(batch, target)``
            pairs when ``loss_fn`` is given (run time only, never saved).
        loss_fn: ``loss_fn(outputs, target) -> scalar`` for taylor; without it the loss is the
            cross-entropy of the outputs against their own top-1 (no labels needed; run time only).
    """

    accepts_compiled: ClassVar[bool] = False

    ratio: float | None = None
    _: KW_ONLY
    structured: bool = True
    pattern: str | None = None
    importance: str = "l2"
    global_pruning: bool = False
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    round_to: int | None = None
    iterative_steps: int = 1
    prune_heads: bool = True
    data: Iterable[Any] | None = runtime_field(default=None, compare=False, repr=False)  # run time only
    loss_fn: Callable[..., Any] | None = runtime_field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("structured", "global_pruning", "prune_heads"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"Prune: {name} must be True or False, got {getattr(self, name)!r}.")
        nm = self.nm
        if self.ratio is not None:
            number = isinstance(self.ratio, (int, float)) and not isinstance(self.ratio, bool)
            if not number or not 0 < self.ratio < 1:
                raise ConfigError(f"Prune: ratio={self.ratio!r} is not allowed; it is the fraction to "
                                  "remove, a number strictly between 0 and 1 (e.g. 0.3).")
            if nm and not math.isclose(self.ratio, 1 - nm[0] / nm[1]):
                raise ConfigError(f"Prune: ratio={self.ratio!r} contradicts pattern={self.pattern!r}, which "
                                  f"removes {1 - nm[0] / nm[1]:g} of the weights; leave ratio out.")
        elif not nm:
            raise ConfigError("Prune: give ratio= (fraction to remove, in (0, 1), e.g. Prune(0.3)) or "
                              "pattern='2:4'.")
        validate_choice("Prune", "importance", self.importance, tuple(IMPORTANCES.names()))
        if self.method != "structured" and self.importance not in ("l1", "l2"):
            raise ConfigError(f"Prune: importance={self.importance!r} is not allowed for {self.method} "
                              "pruning, which ranks single weights by magnitude. Allowed: ['l1', 'l2'].")
        if not isinstance(self.ignore, (str, list, tuple)):
            raise ConfigError(f"Prune: ignore={self.ignore!r} is not allowed; ignore takes module-name patterns "
                              "(a str or a list of str), e.g. ignore=['classifier', '*.head'].")
        if isinstance(self.ignore, str):
            object.__setattr__(self, "ignore", (self.ignore,))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        if not all(isinstance(p, str) for p in self.ignore):
            raise ConfigError(f"Prune: ignore takes module-name patterns (str), got {list(self.ignore)!r}.")
        check_int("Prune", "round_to", self.round_to, low=1, high=1 << 16, optional=True, hint="from the target")
        check_int("Prune", "iterative_steps", self.iterative_steps, low=1, high=1000)
        if self.iterative_steps > 1 and self.method != "structured":
            raise ConfigError(f"Prune: iterative_steps={self.iterative_steps} applies to structured pruning "
                              f"only; {self.method} magnitude pruning in steps equals one step.")
        if self.global_pruning and nm:
            raise ConfigError(f"Prune: global_pruning=True has no meaning with pattern={self.pattern!r} "
                              "(N:M applies to every group of M weights).")

    # ------------------------------------------------------------------ derived settings
    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` of ``pattern``, or None."""
        if self.pattern is None:
            return None
        text = self.pattern if isinstance(self.pattern, str) else ""
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
        if not match or not 0 < int(match[1]) < int(match[2]) <= 32:
            raise ConfigError(f"Prune: pattern={self.pattern!r} is not allowed; it must be 'N:M' with "
                              "0 < N < M <= 32, keeping N of every M weights, e.g. '2:4'.")
        return int(match[1]), int(match[2])

    @property
    def method(self) -> str:
        return "n:m" if self.pattern is not None else "structured" if self.structured else "unstructured"

    @property
    def fraction(self) -> float:
        nm = self.nm
        return 1 - nm[0] / nm[1] if nm else float(self.ratio)  # type: ignore[arg-type]

    def simulated(self) -> bool:
        return PRUNE_METHODS.get(self.method).simulated

    # ------------------------------------------------------------------ checks
    def check_static(self, fmt: str, target: Target) -> None:
        if fmt != "torch":
            raise UnsupportedModelError(
                f"{self.describe()} works on PyTorch modules (format 'torch'), but the model is in format "
                f"{fmt!r}. Prune before Export: an exported graph has its shapes fixed, e.g. "
                "Pipeline([Prune(0.3), Export('onnx')])."
            )
        if PRUNE_METHODS.get(self.method).package:
            require("torch_pruning", extra="prune", package="torch-pruning", purpose=f"{self.describe()}")

    def check_model(self, model: Model) -> None:
        if self.method == "structured" and model.example_inputs is None:
            raise UnsupportedModelError(f"{self.describe()} traces the model to find which channels depend "
                                        "on each other; build the Model with example_inputs=.")
        taylor = self.importance == "taylor"
        if taylor and self.data is None:
            raise ConfigError("Prune: importance='taylor' needs data=[batch, ...] (batches as the model "
                              "takes them) to compute gradients; or use importance='l2'.")
        for name in ("data", "loss_fn"):
            if not taylor and getattr(self, name) is not None:
                raise ConfigError(f"Prune: {name}= is only used by importance='taylor', but "
                                  f"importance={self.importance!r}.")

    # ------------------------------------------------------------------ work
    def run(self, model: Model) -> PassResult:
        module = copy.deepcopy(unwrap(model.artifact))
        method = PRUNE_METHODS.get(self.method)
        details = method.run(module, self, model)
        state = split_state(details, moved=method.state_keys, copied=method.shared_state_keys)
        return PassResult(module, details, changed=details.pop("changed", True), state=state,
                          # 2:4 that really runs on sparse tensor cores is not simulated
                          simulated=False if details.get("accelerated_layers") else None)

    def restore(self, module: Any, record: PassRecord) -> Any:
        PRUNE_METHODS.get(self.method).restore(unwrap(module), record.restore_state())
        return module


def prune(model: Model, ratio: float | None = None, *, name: str | None = None, **settings: Any) -> Model:
    """One-line form of ``Prune(ratio, **settings).apply(model)``; ``name=`` labels the result."""
    return named(Prune(ratio, **settings).apply(model), name)


def pruning_table(model: Model) -> str:
    """The last Prune record as markdown: totals before/after and what each layer lost."""
    record = next((r for r in reversed(model.history) if r.pass_type == "Prune"), None)
    if record is None:
        passes = [r.pass_type for r in model.history]
        raise ConfigError(f"{model.name} has no Prune record (passes: {passes}).")
    d = record.details
    rows = [("parameters", f"{record.params_before:,}", f"{record.params_after:,}"),
            ("memory MB", f"{record.size_before / 1e6:.2f}", f"{record.size_after / 1e6:.2f}")]
    if "macs_per_example_before" in d:
        rows.append(("MACs per example", f"{d['macs_per_example_before']:,}",
                     f"{d['macs_per_example_after']:,}"))
    lines = ["| | before | after |", "|---|---|---|", *[f"| {a} | {b} | {c} |" for a, b, c in rows], ""]
    if d.get("layers"):
        lines += ["| layer | change |", "|---|---|"]
        lines += [f"| {name} | {', '.join(f'{k} {v[0]} -> {v[1]}' for k, v in change.items())} |"
                  for name, change in d["layers"].items()]
    if d.get("note"):
        lines += ["", d["note"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- selection
def _weight_layers(module: nn.Module, settings: Prune,
                   model: Model) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """Linear / conv layers to sparsify, and those left alone with the reason."""
    candidates = {n: m for n, m in module.named_modules()
                  if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) or hf.is_conv1d(m)}
    skipped = {n: f"matches ignore pattern {p!r}" for n in candidates for p in settings.ignore
               if fnmatch.fnmatch(n, p)}
    last = _last_layer_run(module, candidates, model)
    if last is not None and last not in skipped:
        skipped[last] = "last layer to run (the output layer)"
    selected = {n: m for n, m in candidates.items() if n not in skipped}
    if not selected:
        raise UnsupportedModelError(f"{settings.describe()} found no linear or conv layer to prune "
                                    f"outside ignore={list(settings.ignore)}; it would return an unchanged "
                                    "model.")
    return selected, skipped


def _last_layer_run(module: nn.Module, candidates: dict[str, nn.Module], model: Model) -> str | None:
    if model.example_inputs is None:
        return None
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda *_, n=n: order.append(n)) for n, m in candidates.items()]
    try:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        args, kwargs = split_inputs(map_tensors(lambda t: t.to(device), model.example_inputs))
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return order[-1] if order else None


def _as_out_in(layer: nn.Module) -> torch.Tensor:
    """The weight as an (out, in...) view: transformers' Conv1D stores it (in, out)."""
    return layer.weight.data.t() if hf.is_conv1d(layer) else layer.weight.data


# ---------------------------------------------------------------------------------- unstructured
def _run_unstructured(module: nn.Module, settings: Prune, model: Model) -> dict[str, Any]:
    selected, skipped = _weight_layers(module, settings, model)
    weights = {n: _as_out_in(m) for n, m in selected.items()}
    with torch.no_grad():
        if settings.global_pruning:
            flat = torch.cat([w.abs().flatten().float().cpu() for w in weights.values()])
            k = int(flat.numel() * settings.fraction)
            threshold = flat.kthvalue(k).values.item() if k else -1.0
            for w in weights.values():
                w.mul_(w.abs() > threshold)
        else:
            for w in weights.values():
                k = int(w.numel() * settings.fraction)
                if k:  # exactly k zeros per layer (w may be a transposed view: mask, then multiply)
                    keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
                    keep[torch.topk(w.abs().flatten(), k, largest=False).indices] = False
                    w.mul_(keep.view(w.shape))
    sparsity = {n: round(float((w == 0).float().mean()), 4) for n, w in weights.items()}
    total = sum(w.numel() for w in weights.values())
    return {
        "sparsity": round(sum(float((w == 0).sum()) for w in weights.values()) / total, 4),
        "layers_pruned": len(weights), "layer_sparsity": sparsity, "layers_skipped": skipped,
        "note": "Weights are zeroed in dense tensors: dense kernels still multiply every zero, so size "
                "and speed do not change (simulated). Sparse storage or kernels are needed to gain from it.",
    }


# ---------------------------------------------------------------------------------- N:M
def _run_nm(module: nn.Module, settings: Prune, model: Model) -> dict[str, Any]:
    n_keep, m_group = settings.nm  # type: ignore[misc]
    selected, skipped = _weight_layers(module, settings, model)
    masked = []
    with torch.no_grad():
        for name, layer in selected.items():
            w = _as_out_in(layer)
            if isinstance(layer, nn.modules.conv._ConvNd):
                skipped[name] = "N:M sparsity applies to linear layers"
                continue
            if w.shape[1] % m_group:
                skipped[name] = f"{w.shape[1]} input features are not a multiple of {m_group}"
                continue
            groups = w.reshape(w.shape[0], -1, m_group)
            drop = torch.topk(groups.abs(), m_group - n_keep, dim=-1, largest=False).indices
            mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
            w.mul_(mask.reshape(w.shape))
            masked.append(name)
    if not masked:
        raise UnsupportedModelError(f"{settings.describe()}: no layer could take the pattern: {skipped}.")
    accelerated, reason = _semi_structured(module, settings, model.target, masked, skipped)
    return {
        "pattern": settings.pattern, "layers_pruned": len(masked), "layers_skipped": skipped,
        "accelerated_layers": accelerated,
        "kernel": "torch semi-structured sparse (sparse tensor cores)" if accelerated else "dense (masked)",
        "note": ("2:4 weights run on sparse tensor cores for the accelerated layers." if accelerated else
                 f"Applied as a mask in dense weights (simulated): {reason}. No speed or size gain."),
    }


def _semi_structured(module: nn.Module, settings: Prune, target: Target, masked: list[str],
                     skipped: dict[str, str]) -> tuple[list[str], str]:
    """Swap 2:4-masked linear weights for torch semi-structured sparse tensors where the hardware
    runs them (sm_80+ sparse tensor cores); else say why not."""
    if settings.pattern.replace(" ", "") != "2:4":  # type: ignore[union-attr]
        return [], f"only 2:4 has sparse tensor-core kernels, pattern is {settings.pattern!r}"
    if target.device_type != "cuda" or not target.has_feature("sparse_2_4"):
        return [], f"target {target.name!r} has no sparse tensor cores (feature 'sparse_2_4')"
    if not torch.cuda.is_available():
        return [], "torch.cuda.is_available() is False on this machine"
    device = next(module.parameters()).device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return [], f"the weights are on {device}, not on an sm_80+ GPU"
    from torch.sparse import to_sparse_semi_structured

    accelerated = []
    for name in masked:
        layer = module.get_submodule(name)
        if not isinstance(layer, nn.Linear):
            continue
        try:
            layer.weight = nn.Parameter(to_sparse_semi_structured(layer.weight.detach()), requires_grad=False)
            accelerated.append(name)
        except (RuntimeError, ValueError) as e:
            skipped[name] = f"dense mask only: {str(e).splitlines()[0]}"
    if accelerated:
        module.register_state_dict_post_hook(_densify_state)
    return accelerated, "no layer fits the semi-structured kernels' shape and dtype rules"


def _densify_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """Save semi-structured weights as plain (masked) dense tensors, loadable with weights_only."""
    for key, value in list(state_dict.items()):
        if isinstance(value, torch.sparse.SparseSemiStructuredTensor):
            state_dict[key] = value.to_dense()


def _restore_nm(module: nn.Module, state: dict[str, Any]) -> None:
    if state.get("accelerated_layers"):
        log.warning("Model.load: the 2:4 weights load as masked dense tensors on the CPU; run "
                    "Prune(pattern='2:4') again with the model on the GPU to use sparse tensor cores.")


PRUNE_METHODS.register("structured", PruneMethod(name="structured", run=_run_structured,
                                                 restore=replay_structure, simulated=False,
                                                 package="torch_pruning", state_keys=("structure",)))
PRUNE_METHODS.register("unstructured", PruneMethod(name="unstructured", run=_run_unstructured,
                                                   restore=lambda module, details: None, simulated=True))
PRUNE_METHODS.register("n:m", PruneMethod(name="n:m", run=_run_nm, restore=_restore_nm, simulated=True,
                                          shared_state_keys=("accelerated_layers",)))
