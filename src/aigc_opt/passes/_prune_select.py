"""What a structured prune may touch: Torch-Pruning's dependency graph of the model and the layers
left alone, each with its reason (ignore patterns, embeddings, layers whose channels are model
outputs, grouped convolutions Torch-Pruning cannot cut consistently, tied weights).

``select`` traces the module once and returns a ``Selection``; ``roots`` and ``touches`` are the two
small questions ``_prune_structured`` asks of Torch-Pruning's groups while it plans and prunes.
"""

from __future__ import annotations

import fnmatch
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._tree import flatten_tensors
from ..errors import UnsupportedModelError

if TYPE_CHECKING:
    from .prune import Prune

__all__ = ["Selection", "select", "roots", "touches"]

log = logging.getLogger("aigc_opt")


@dataclass
class Selection:
    """What Torch-Pruning may touch: its dependency graph, the layers left alone and why."""

    dg: Any
    reasons: dict[str, str]
    ignored_params: Any
    frozen: set[nn.Module]
    ignored: list[nn.Module]
    untraced: list[str]
    num_heads: dict[nn.Module, int]



def select(tp: Any, module: nn.Module, settings: Prune, one: Any, forward_one: Any, ran: Any,
            attention: dict[str, Any], names: dict[nn.Module, str]) -> Selection:
    """Trace the module and decide what stays: ignored layers, fixed channels, untraced layers."""
    dg, output_fns = _trace(tp, module, one, forward_one, ran)
    reasons, ignored_params = _ignored(tp, dg, module, settings, names, output_fns)
    fixed = {**_fixed_convs(tp, dg, names), **_tied_layers(module)}  # channels that must not move
    for name, why in fixed.items():
        reasons.setdefault(name, why)
    untraced = sorted(n for n in ran if module.get_submodule(n) not in dg.module2node
                      and not any(n == r or n.startswith(r + ".") for r in reasons))
    if untraced:
        log.warning("Prune: Torch-Pruning did not see %s in its trace (not reached from the outputs "
                    "through autograd); they are left unchanged.", untraced)
    num_heads = {layer: a.num_heads(module.get_submodule(n)) for n, a in attention.items()
                 for layer in a.head_layers(module.get_submodule(n))}
    return Selection(dg=dg, reasons=reasons, ignored_params=ignored_params,
                      frozen={module.get_submodule(n) for n in fixed},
                      ignored=[module.get_submodule(n) for n in reasons], untraced=untraced, num_heads=num_heads)


def _trace(tp: Any, module: nn.Module, inputs: Any, forward: Callable[..., Any],
           ran: list[str]) -> tuple[Any, set[Any]]:
    """Torch-Pruning's dependency graph, and the grad_fns of the model's outputs."""
    outputs: list[Any] = []

    def capture(m: nn.Module, x: Any) -> Any:
        outputs.append(forward(m, x))
        return outputs[-1]

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dg = tp.DependencyGraph().build_dependency(module, example_inputs=inputs, forward_fn=capture,
                                                       verbose=False)
        error = None
    except Exception as e:
        dg, error = None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    returned = flatten_tensors(outputs[-1] if outputs else None)
    floats = {k: t for k, t in returned.items() if t.is_floating_point()}
    detached = sorted(k for k, t in floats.items() if t.grad_fn is None)
    if error or detached or not floats:
        unseen = [n for n in ran if dg is None or module.get_submodule(n) not in dg.module2node]
        raise UnsupportedModelError(
            f"Torch-Pruning cannot trace {type(module).__name__}: "
            + (error or f"output(s) {detached or 'all'} do not depend on the weights through autograd")
            + f"; layers it cannot see: {unseen}. It follows the autograd graph of one forward pass on "
            "example_inputs, so forward must not use torch.no_grad, detach or non-torch ops on the way to "
            "the outputs. Use structured=False for this model."
        )
    return dg, {t.grad_fn for t in floats.values()}


def _ignored(tp: Any, dg: Any, module: nn.Module, settings: Prune, names: dict[Any, str],
             output_fns: set[Any]) -> tuple[dict[str, str], list[torch.Tensor]]:
    """Layers left alone (name -> why), and unwrapped parameters of ignored layers."""
    reasons: dict[str, str] = {}
    for name, m in module.named_modules():
        if not name or any(name.startswith(r + ".") for r in reasons):
            continue
        pattern = next((p for p in settings.ignore if fnmatch.fnmatch(name, p)), None)
        if pattern:
            reasons[name] = f"matches ignore pattern {pattern!r}"
        elif isinstance(m, nn.Embedding):
            reasons[name] = "embedding: the hidden width is kept"
        elif isinstance(m, nn.MultiheadAttention):
            reasons[name] = "nn.MultiheadAttention: not pruned"
    for m, node in dg.module2node.items():  # a layer whose own output is returned
        if isinstance(m, nn.Module) and node.grad_fn in output_fns and m in names:
            reasons.setdefault(names[m], "its output is a model output")
    for group in dg.get_all_groups(ignored_layers=[], root_module_types=roots(tp)):
        if any(dep.target.type == tp.ops.OPTYPE.OUTPUT for dep, _ in group):  # reaches one through ops
            root = names.get(group[0].dep.target.module, "?")
            reasons.setdefault(root, "its channels are a model output")
    param_names = {id(p): n for n, p in module.named_parameters()}
    ignored_params = []
    for p, _dim in dg.unwrapped_parameters:
        if p not in dg.module2node or sum(s > 1 for s in p.shape) < 2:
            continue  # unused, or a vector Torch-Pruning prunes along its one dimension
        pname = param_names.get(id(p), "?")
        owner = pname.rpartition(".")[0]
        if any(owner == r or owner.startswith(r + ".") for r in reasons):
            ignored_params.append(p)
            continue
        raise UnsupportedModelError(
            f"Prune: layer {owner!r} ({type(module.get_submodule(owner)).__name__}) uses its "
            f"{tuple(p.shape)} parameter {pname!r} in a way Torch-Pruning has no rule for (it is not a "
            "Linear, Conv, norm or Embedding), so the channels it touches cannot be removed consistently. "
            f"Add {owner!r} to ignore= to leave them alone, or use structured=False."
        )
    return reasons, ignored_params


def roots(tp: Any) -> list[type]:
    return [tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR, tp.ops.TORCH_LSTM]


def touches(group: Any, modules: set[nn.Module]) -> bool:
    return bool(modules) and any(dep.target.module in modules for dep, _ in group)


def _fixed_convs(tp: Any, dg: Any, names: dict[Any, str]) -> dict[str, str]:
    """Grouped convolutions whose channels Torch-Pruning 1.6.1 cannot remove consistently, so they
    and every layer coupled to their channels are left alone (name -> why):

    - ``groups`` equal to the input or the output channels but not both (a depthwise convolution
      with a channel multiplier, or its reverse): its importance has the wrong length (IndexError)
      or the depthwise rule removes as many input as output channels;
    - a depthwise convolution whose channels come straight from a model input: the depthwise rule
      removes output and input channels together, but nothing can remove the input's channels.
    """
    fixed = {}
    for m, node in dg.module2node.items():
        if not isinstance(m, nn.modules.conv._ConvNd) or m.groups == 1 or m not in names:
            continue
        if m.in_channels != m.out_channels and m.groups in (m.in_channels, m.out_channels):
            fixed[names[m]] = (f"grouped convolution (groups={m.groups}, {m.in_channels} -> {m.out_channels} "
                               "channels): Torch-Pruning 1.6.1 cannot remove its channels consistently")
        elif m.groups == m.in_channels == m.out_channels:
            group = dg.get_pruning_group(m, tp.prune_depthwise_conv_out_channels, [0])
            producers = [dep.target.module for dep, _ in group if dep.target.module is not m
                         and isinstance(dep.target.module, (nn.Linear, nn.modules.conv._ConvNd))
                         and dg.is_out_channel_pruning_fn(dep.handler)]
            if not producers:
                fixed[names[m]] = ("depthwise convolution on a model input's channels, which cannot be "
                                   "removed (Torch-Pruning 1.6.1 would remove them from the weights only)")
    return fixed


def _tied_layers(module: nn.Module) -> dict[str, str]:
    """Layers sharing a weight with another module (name -> why), such as BERT's MLM decoder and its
    word embeddings: removing channels from one copy would untie them and store the weight twice."""
    owners: dict[int, list[str]] = {}
    for name, m in module.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            if name not in owners.setdefault(id(p), []):
                owners[id(p)].append(name)
    tied = {}
    for names in owners.values():
        for name in names if len(names) > 1 else ():
            others = [n for n in names if n != name]
            tied[name] = f"its weight is tied to {others} (pruning it would untie and duplicate the weight)"
    return tied
