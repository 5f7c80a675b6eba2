"""Inputs and outputs as trees: a tuple of positional args or a dict of keyword args in, any
nesting of tuples/lists/dicts/ModelOutputs of tensors out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch

from .errors import InvalidInputError

__all__ = ["Inputs", "normalize_inputs", "split_inputs", "batch_size", "flatten_tensors",
           "map_tensors", "describe"]

# One batch: positional args as a tuple, keyword args as a dict (how Hugging Face models are called).
Inputs = Union[tuple[Any, ...], dict[str, Any]]


def normalize_inputs(inputs: Any, *, what: str = "inputs") -> Inputs:
    """A tensor becomes a 1-tuple; tuples and dicts (e.g. a tokenizer's BatchEncoding) pass through."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, Mapping):
        bad = [k for k in inputs if not isinstance(k, str)]
        if bad:
            raise InvalidInputError(f"{what}: dict keys must be argument names (str), got {bad!r}.")
        return dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    raise InvalidInputError(
        f"{what} must be a tensor, a tuple of positional arguments or a dict of keyword arguments; "
        f"got {type(inputs).__name__}. Wrap a single tensor x as (x,)."
    )


def split_inputs(inputs: Inputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return ((), dict(inputs)) if isinstance(inputs, dict) else (tuple(inputs), {})


def batch_size(inputs: Inputs) -> int:
    """The leading dimension of the first tensor (1 when there is none)."""
    for t in flatten_tensors(inputs).values():
        return int(t.shape[0]) if t.dim() > 0 else 1
    return 1


def flatten_tensors(tree: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in ``tree`` by path (``"0"``, ``"last_hidden_state"``, ``"1.logits"``)."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(tree, torch.Tensor):
        out[prefix or "output"] = tree
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            out.update(flatten_tensors(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, Sequence) and not isinstance(tree, (str, bytes)):
        for i, v in enumerate(tree):
            out.update(flatten_tensors(v, f"{prefix}.{i}" if prefix else str(i)))
    return out


def map_tensors(fn: Any, tree: Any) -> Any:
    """Apply ``fn`` to every tensor, keeping the structure (tuple, list, dict, ModelOutput)."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, Mapping):
        mapped = {k: map_tensors(fn, v) for k, v in tree.items()}
        try:
            return type(tree)(**mapped) if hasattr(tree, "to_tuple") else type(tree)(mapped)
        except TypeError:
            return mapped
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple
        return type(tree)(*(map_tensors(fn, v) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(map_tensors(fn, v) for v in tree)
    return tree


def describe(tree: Any) -> str:
    """A short description of the tensors in ``tree`` for error messages."""
    parts = [f"{k}: {tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"
             for k, t in flatten_tensors(tree).items()]
    return "{" + ", ".join(parts) + "}" if parts else "(no tensors)"
