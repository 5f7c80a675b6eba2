"""The pruned structure, recorded and replayed: a snapshot of every module's size attributes and
tensor shapes, the difference before/after a structured prune (what ``Model.load`` replays and what
the report shows), and the replay that gives a freshly built skeleton the pruned sizes before its
weights are loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UnsupportedModelError
from . import _prune_hf as hf

__all__ = ["snapshot", "diff", "replay_structure"]


def snapshot(module: nn.Module) -> dict[str, dict[str, Any]]:
    """Per module: integer attributes (sizes such as out_features, num_heads) and tensor shapes."""
    def sizes(v: Any) -> bool:
        return (isinstance(v, int) and not isinstance(v, bool)) or (
            isinstance(v, tuple) and bool(v) and all(type(x) is int for x in v))

    return {name: {"attrs": {k: v for k, v in vars(m).items() if not k.startswith("_") and sizes(v)},
                   "tensors": {k: list(t.shape) for store in (m._parameters, m._buffers)
                               for k, t in store.items() if t is not None}}
            for name, m in module.named_modules()}


def diff(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(what restore replays: new sizes per module, what the report shows: attr [before, after])."""
    modules, layers = {}, {}
    for name, new in after.items():
        old = before.get(name, {"attrs": {}, "tensors": {}})
        attrs = {k: v for k, v in new["attrs"].items() if k in old["attrs"] and old["attrs"][k] != v}
        tensors = {k: s for k, s in new["tensors"].items() if old["tensors"].get(k) != s}
        if attrs or tensors:
            modules[name] = {"attrs": {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.items()},
                             "tensors": tensors}
        if attrs:
            layers[name] = {k: [old["attrs"][k], v] for k, v in attrs.items()}
    return modules, layers


def replay_structure(module: nn.Module, state: dict[str, Any]) -> None:
    """Restore: give a freshly built skeleton the pruned structure (weights come after)."""
    structure = state["structure"]
    try:
        for name, adapter in structure.get("attention_prepared", {}).items():
            hf.ATTENTION_ADAPTERS.get(adapter).prepare(module.get_submodule(name))
        hf.convert_conv1d(module, list(structure.get("conv1d", [])))
        memo: dict[int, torch.Tensor] = {}  # tied weights stay tied
        for name, entry in structure["modules"].items():
            sub = module.get_submodule(name)
            for key, shape in entry["tensors"].items():
                store = sub._parameters if key in sub._parameters else sub._buffers
                old = store[key]
                if id(old) not in memo:
                    new = torch.zeros(shape, dtype=old.dtype, device=old.device)
                    memo[id(old)] = (nn.Parameter(new, requires_grad=old.requires_grad)
                                     if isinstance(old, nn.Parameter) else new)
                store[key] = memo[id(old)]
            for key, value in entry["attrs"].items():
                setattr(sub, key, tuple(value) if isinstance(getattr(sub, key, None), tuple) else value)
        for name, adapter in structure.get("attention_prepared", {}).items():
            finish = hf.ATTENTION_ADAPTERS.get(adapter).finish
            if finish:
                finish(module.get_submodule(name))
        hf.apply_config(module, structure.get("config", {}))
    except (AttributeError, KeyError) as e:
        raise UnsupportedModelError(f"The rebuilt module does not have the layers this Prune record "
                                    f"changed ({e}); load it with module= an instance of the saved "
                                    "architecture.") from e
