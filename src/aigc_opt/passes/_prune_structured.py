"""Structured pruning with Torch-Pruning (the ``structured`` method of ``passes/prune.py``).

``_run_structured`` traces the model's dependency graph, decides which layers are left alone
(ignore patterns, embeddings, layers whose channels are model outputs; both in ``_prune_select``),
plans per-layer ratios that keep a multiple of ``round_to`` channels, prunes (in ``iterative_steps``
steps, importance re-estimated each time) and checks the output shapes. Transformers' attention heads
are handled by the adapters in ``_prune_hf``. What changed is recorded as new sizes per module
(``_prune_structure``), which ``replay_structure`` there gives a freshly built skeleton on ``Model.load``.
torch_pruning is imported only when a structured prune runs.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._deps import library_versions, require
from .._tree import flatten_tensors, map_tensors, normalize_inputs, split_inputs
from ..errors import ConfigError, UnsupportedModelError
from . import _prune_hf as hf
from ._prune_rules import IMPORTANCES, STRUCTURE_RULES, default_round_to, structure_rule_key
from ._prune_select import Selection, roots, select, touches
from ._prune_structure import diff, snapshot

if TYPE_CHECKING:
    from ..model import Model
    from .prune import Prune

__all__ = ["_run_structured"]  # what passes/prune.py imports


def _run_structured(module: nn.Module, settings: Prune, model: Model) -> dict[str, Any]:
    tp = require("torch_pruning", extra="prune", package="torch-pruning", purpose=settings.describe())
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    inputs = map_tensors(lambda t: t.to(device), model.example_inputs)
    args, kwargs = split_inputs(inputs)
    # Torch-Pruning traces with autograd on; one example gives the same graph at a fraction of the cost.
    one = map_tensors(lambda t: t[:1] if t.dim() else t, inputs)
    one_args, one_kwargs = split_inputs(one)

    def forward(m: nn.Module, _: Any = None) -> Any:
        return m(*args, **kwargs)

    def forward_one(m: nn.Module, _: Any = None) -> Any:
        return m(*one_args, **one_kwargs)

    attention = hf.find_attention(module)
    prepared = {n: a.name for n, a in attention.items() if a.prepare and a.prepare(module.get_submodule(n))}
    conv1d = hf.convert_conv1d(module)  # GPT-2's Conv1D: Torch-Pruning knows nn.Linear
    round_to, why = ((settings.round_to, "set by the user") if settings.round_to
                     else default_round_to(model.target))
    reference, ran = _forward(module, forward)
    macs_before = _macs(module, forward_one)
    before, q_before = snapshot(module), hf.head_snapshot(module, attention)
    names = {m: n for n, m in module.named_modules()}
    with _traceable(module), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # importance="random" is reproducible; the caller's RNG is restored
        selection = select(tp, module, settings, one, forward_one, ran, attention, names)
        plan = _prune_in_place(tp, module, settings, selection, attention, names, one, forward_one, round_to, device)
    _apply_structure_rules(module, forward_one)
    heads = _heads(module, attention, q_before)
    modules, layers = diff(before, snapshot(module))
    for n, a in attention.items():
        if a.finish:
            a.finish(module.get_submodule(n))
    config, config_notes = hf.update_config(module)
    output, _ = _forward(module, forward, after_pruning=True)
    _check_outputs(reference, output)
    return {
        "changed": bool(modules), "importance": settings.importance, "round_to": round_to,
        "round_to_reason": why, "macs_per_example_before": macs_before,
        "macs_per_example_after": _macs(module, forward_one),
        "heads": heads, "layers": layers, "ignored": selection.reasons,
        "planned_channels": {} if settings.global_pruning else plan,  # global: ranked across layers
        "untraced_layers": selection.untraced, "example_cosine": _cosine(reference, output),
        "hidden_width": "kept: embeddings and layers producing outputs are not pruned (Torch-Pruning 1.6.1 "
                        "prunes BERT's hidden width but leaves its untraced pooler at the old width)",
        "config": config, "config_notes": config_notes,
        "structure": {"attention_prepared": prepared, "conv1d": conv1d, "modules": modules, "config": config},
    }


def _prune_in_place(tp: Any, module: nn.Module, settings: Prune, sel: Selection, attention: dict[str, Any],
                    names: dict[nn.Module, str], one: Any, forward_one: Any, round_to: int,
                    device: torch.device) -> dict[str, Any]:
    """Plan each layer's channels, then remove them in ``iterative_steps`` steps; returns the plan."""
    ratios, plan = _plan(tp, sel.dg, sel.ignored, sel.num_heads, settings, round_to, names, sel.frozen)
    importance = _Tracked(IMPORTANCES.get(settings.importance)(tp), names, sel.frozen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Torch-Pruning warns on every unknown op it traces
        pruner = tp.pruner.MetaPruner(
            module, one, importance=importance, global_pruning=settings.global_pruning,
            pruning_ratio=settings.ratio, pruning_ratio_dict=None if settings.global_pruning else ratios,
            iterative_steps=settings.iterative_steps, ignored_layers=sel.ignored,
            round_to=round_to if settings.global_pruning and round_to > 1 else None,
            # fresh dicts: Torch-Pruning's defaults are shared mutable dicts it writes into
            in_channel_groups={}, out_channel_groups={}, num_heads=dict(sel.num_heads),
            prune_num_heads=settings.prune_heads and bool(sel.num_heads), prune_head_dims=False,
            head_pruning_ratio=settings.ratio if settings.prune_heads else 0.0, forward_fn=forward_one)
    if settings.iterative_steps > 1 and settings.prune_heads:
        # Torch-Pruning 1.6.1 removes ceil(step ratio x *current* heads) per step, which compounds
        # over steps; whole heads are removed in the last step instead (exactly ceil(ratio x heads)).
        pruner.per_step_head_pruning_ratio = [0.0] * settings.iterative_steps + [settings.ratio]
    batches = list(settings.data) if settings.importance == "taylor" else []
    if settings.importance == "taylor" and not batches:
        raise ConfigError("Prune: importance='taylor' got data with no batches; give at least one.")
    for _ in range(settings.iterative_steps):
        importance.grads = _gradients(module, batches, settings, device) if batches else []
        _step(tp, pruner, importance, sel.ignored_params, names)
        for n, a in attention.items():
            a.update(module.get_submodule(n))
    return plan


class _Tracked:
    """An importance that remembers which layer it scored last (so a failure inside Torch-Pruning
    can name it) and, for Taylor, sums |weight x gradient| over batches, one gradient per batch
    (Molchanov et al. 2019): the gradient summed over a dataset is close to zero for a trained model."""

    def __init__(self, inner: Any, names: dict[Any, str], frozen: set[nn.Module] | None = None):
        self.inner, self.names, self.layer = inner, names, "?"
        self.frozen = frozen or set()
        self.grads: list[dict[torch.Tensor, torch.Tensor]] = []

    def __call__(self, group: Any) -> Any:
        self.layer = self.names.get(group[0].dep.target.module, "?")
        if touches(group, self.frozen):
            return None  # Torch-Pruning skips a group without importance
        if not self.grads:
            return self.inner(group)
        total = None
        for grads in self.grads:
            for param, grad in grads.items():
                param.grad = grad
            score = self.inner(group)
            total = score if total is None else total + score
        return total


def _step(tp: Any, pruner: Any, importance: _Tracked, ignored_params: list[torch.Tensor],
          names: dict[Any, str]) -> None:
    try:
        for group in pruner.step(interactive=True):
            importance.layer = names.get(group[0].dep.target.module, "?")
            if not any(dep.target.module is p for dep, _ in group for p in ignored_params) and not touches(
                    group, importance.frozen):
                group.prune()
    except Exception as e:
        raise UnsupportedModelError(
            f"Torch-Pruning {library_versions().get('torch-pruning', '')} failed on layer "
            f"{importance.layer!r}: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Add {importance.layer!r} to "
            "ignore= to leave it (and the channels coupled to it) alone."
        ) from e


@contextlib.contextmanager
def _traceable(module: nn.Module) -> Iterator[None]:
    """Autograd on (Torch-Pruning traces grad_fns) and transformers' KV cache off (cached keys
    and values are outputs, which would pin the attention widths); both restored afterwards."""
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    configs = {id(c): c for m in module.modules() if hasattr(c := getattr(m, "config", None), "use_cache")}
    caches = {k: c.use_cache for k, c in configs.items()}
    for p in module.parameters():
        p.requires_grad_(True)
    for c in configs.values():
        c.use_cache = False
    try:
        with torch.enable_grad():
            yield
    finally:
        for n, p in module.named_parameters():
            p.requires_grad_(flags.get(n, True))
            p.grad = None
        for k, c in configs.items():
            c.use_cache = caches[k]


def _plan(tp: Any, dg: Any, ignored: list[nn.Module], num_heads: dict[nn.Module, int], settings: Prune,
          round_to: int, names: dict[Any, str],
          frozen: set[nn.Module] | None = None) -> tuple[dict[nn.Module, float], dict[str, list[int]]]:
    """Per-layer ratios that keep a multiple of ``round_to`` channels (nearest to the ratio), and
    refusal of a ratio that would empty a layer, before anything is pruned."""
    ratio = float(settings.ratio)  # type: ignore[arg-type]
    skip = [sub for m in ignored for sub in m.modules()]
    ratios, plan = {}, {}
    groups = [g for g in dg.get_all_groups(ignored_layers=skip, root_module_types=roots(tp))
              if not touches(g, frozen or set())]
    for group in groups:
        root = group[0].dep.target.module
        name = names.get(root, "?")
        heads = [num_heads[d.target.module] for d, _ in group
                 if d.target.module in num_heads and dg.is_out_channel_pruning_fn(d.handler)]
        if heads:
            if settings.prune_heads and math.ceil(ratio * max(heads)) >= max(heads):
                raise ConfigError(f"Prune: ratio={ratio} would remove all {max(heads)} attention heads of "
                                  f"{name!r}; use ratio < {(max(heads) - 1) / max(heads):.3f} or "
                                  "prune_heads=False.")
            continue
        n = dg.get_out_channels(root)
        if not n:
            continue
        if n * (1 - ratio) < 1:
            raise ConfigError(f"Prune: ratio={ratio} would remove every channel of layer {name!r} ({n} "
                              f"channels); the largest ratio that keeps one is {1 - 1 / n:.3f}, or add "
                              f"{name!r} to ignore=.")
        kept = _kept(n, ratio, round_to)
        ratios[root] = 0.0 if kept >= n else 1 - (kept + 0.5) / n  # int(n * (1 - r)) == kept
        plan[name] = [n, kept]
    if not groups:
        left_alone = sorted(names[m] for m in ignored)
        raise UnsupportedModelError(f"{settings.describe()} found no channels it may remove: every group of "
                                    f"coupled channels feeds an output or an ignored layer ({left_alone}).")
    return ratios, plan


def _apply_structure_rules(module: nn.Module, forward: Callable[..., Any]) -> None:
    """Set the size attributes of layers with a STRUCTURE_RULES entry from their pruned inputs: one
    forward pass with pre-hooks (outer layers first, so an inner layer's check sees fixed values)."""
    hooks = [m.register_forward_pre_hook(lambda m, args: STRUCTURE_RULES.get(structure_rule_key(m))(m, args))
             for m in module.modules() if structure_rule_key(m) in STRUCTURE_RULES]
    if not hooks:
        return
    try:
        with torch.no_grad():
            forward(module)
    except Exception:
        pass  # the check after pruning runs the model again and names the layer that fails
    finally:
        for h in hooks:
            h.remove()


def _kept(n: int, ratio: float, round_to: int) -> int:
    """Channels kept of ``n``: n x (1 - ratio) rounded down (as Torch-Pruning does), or to the
    nearest multiple of ``round_to`` (at least one multiple) when the layer is wider than it."""
    raw = n * (1 - ratio)
    if round_to <= 1 or n <= round_to:
        return max(1, int(raw))
    return min(n, max(round_to, round(raw / round_to) * round_to))


def _gradients(module: nn.Module, batches: list[Any], settings: Prune,
               device: torch.device) -> list[dict[torch.Tensor, torch.Tensor]]:
    """One set of gradients per batch of ``data``, for Taylor importance."""
    grads = []
    for i, item in enumerate(batches):
        module.zero_grad(set_to_none=True)
        if settings.loss_fn is not None:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ConfigError(f"Prune: with loss_fn=, data items are (batch, target) pairs; data[{i}] "
                                  f"is a {type(item).__name__}, not a pair.")
            item, target = item
        batch = map_tensors(lambda t: t.to(device), normalize_inputs(item, what=f"Prune data[{i}]"))
        args, kwargs = split_inputs(batch)
        outputs = module(*args, **kwargs)
        if settings.loss_fn is not None:
            loss = settings.loss_fn(outputs, map_tensors(lambda t: t.to(device), target))
        else:
            loss = _self_label_loss(outputs)
        loss.backward()
        grads.append({p: p.grad for p in module.parameters() if p.grad is not None})
    module.zero_grad(set_to_none=True)
    return grads


def _self_label_loss(outputs: Any) -> torch.Tensor:
    """Cross-entropy of the outputs against their own top-1: nonzero gradients without labels."""
    tensors = [t for t in flatten_tensors(outputs).values() if t.is_floating_point()]
    if not tensors or tensors[0].shape[-1] < 2:
        raise ConfigError("Prune: importance='taylor' needs loss_fn=(outputs, target) -> loss for a model "
                          "whose output is not a vector of scores per example.")
    logits = tensors[0].reshape(-1, tensors[0].shape[-1]).float()
    return nn.functional.cross_entropy(logits, logits.argmax(-1))


def _forward(module: nn.Module, forward: Callable[..., Any], *,
             after_pruning: bool = False) -> tuple[Any, list[str]]:
    """Run once: outputs and the weight layers that ran. A failure after pruning names the layer it
    happened in (the innermost module entered and not left)."""
    stack: list[str] = []
    ran: list[str] = []
    hooks = []
    for name, m in module.named_modules():
        hooks.append(m.register_forward_pre_hook(lambda *_, n=name: stack.append(n)))
        hooks.append(m.register_forward_hook(lambda *_: (stack.pop(), None)[1]))
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            hooks.append(m.register_forward_hook(lambda *_, n=name: ran.append(n)))
    try:
        with torch.no_grad():
            outputs = forward(module)
    except Exception as e:
        if not after_pruning:
            raise
        layer = stack[-1] if stack else ""
        where = (f"layer {layer!r} ({type(module.get_submodule(layer)).__name__})" if layer
                 else f"{type(module).__name__}.forward itself")
        raise UnsupportedModelError(
            f"After pruning, {where} fails: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "Torch-Pruning did not follow the data flow there (an op autograd does not see, or a size "
            "written as a constant); add the layers that feed it to ignore=."
        ) from e
    finally:
        for h in hooks:
            h.remove()
    return outputs, sorted(set(ran))


def _macs(module: nn.Module, forward: Callable[..., Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward(module)
    return int(counter.get_total_flops()) // 2


def _check_outputs(reference: Any, outputs: Any) -> None:
    before = {k: tuple(t.shape) for k, t in flatten_tensors(reference).items()}
    after = {k: tuple(t.shape) for k, t in flatten_tensors(outputs).items()}
    if before != after:
        changed = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()
                   if before.get(k) != after.get(k)}
        raise UnsupportedModelError(f"Pruning changed the model's output shapes {changed}; add the layer "
                                    "that produces that output to ignore=.")


def _cosine(reference: Any, outputs: Any) -> float | None:
    """Mean per-example cosine of the first float output on the example batch (before any recovery)."""
    a = next((t for t in flatten_tensors(reference).values() if t.is_floating_point()), None)
    b = next((t for t in flatten_tensors(outputs).values() if t.is_floating_point()), None)
    if a is None or b is None or a.dim() == 0:
        return None
    cos = nn.functional.cosine_similarity(a.reshape(a.shape[0], -1).float(),
                                          b.reshape(b.shape[0], -1).float())
    return round(float(cos.mean()), 4)


def _heads(module: nn.Module, attention: dict[str, hf.AttentionAdapter],
           q_before: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    heads = {}
    for name, adapter in attention.items():
        sub = module.get_submodule(name)
        dim = adapter.head_dim(sub)
        before = q_before[name].shape[0] // dim
        if adapter.num_heads(sub) != before:
            heads[name] = {"before": before, "after": adapter.num_heads(sub),
                           "removed": hf.removed_heads(q_before[name], adapter.head_layers(sub)[0].weight,
                                                       dim)}
    return heads
