"""The inputs of one ONNX Runtime session run, checked before ONNX Runtime sees them.

A batch (a tuple of positional tensors or a dict by name, torch tensors or numpy arrays) is put in
the order the session declares its inputs (:func:`input_values`), cast to the declared element
types and checked against the declared ranks and fixed sizes (:func:`make_feed`) and against the
symbolic sizes several inputs share (:func:`check_shared_axes`); what ONNX Runtime still refuses,
or a kernel fails on, comes back from :func:`session_run` as an :class:`InvalidInputError` naming
the inputs given and declared. :class:`aigc_opt.runtime.onnxruntime.OnnxRuntime` runs them in
this order::

    declared = artifact.declared_inputs()
    feed = make_feed(declared, input_values(declared, inputs))
    check_shared_axes(declared, feed)
    outputs = session_run(artifact.session(), feed, declared)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .._tree import Inputs, describe, flatten_tensors
from ..errors import InvalidInputError

__all__ = ["to_numpy", "check_shared_axes", "input_values", "make_feed", "session_run"]

# ONNX element types -> numpy, for casting inputs to what the session declares.
_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def to_numpy(value: Any, expected: str, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().numpy()
    else:
        array = np.asarray(value)
    dtype = _ORT_TYPES.get(expected)
    if dtype is not None and array.dtype != dtype:
        if array.dtype.kind != np.dtype(dtype).kind and not (array.dtype.kind in "iu" and np.dtype(dtype).kind in "iu"):
            raise InvalidInputError(
                f"Input {name!r} has dtype {array.dtype}, but the ONNX model expects {expected}."
            )
        array = array.astype(dtype)
    return array


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_shared_axes(declared: list[tuple[str, str, int, list[Any]]], feed: dict[str, np.ndarray]) -> None:
    """Axes the graph names alike (one symbolic size, e.g. the sequence of input_ids and of
    attention_mask) must be equal: say which ones differ before ORT fails deep in a kernel."""
    seen: dict[str, tuple[str, int, int]] = {}
    for name, _, _, shape in declared:
        for axis, dim in enumerate(shape):
            if not isinstance(dim, str) or not dim:
                continue
            size = feed[name].shape[axis]
            first = seen.setdefault(dim, (name, axis, size))
            if first[2] != size:
                raise InvalidInputError(
                    f"Input {name!r} has size {size} on axis {axis}, but {first[0]!r} has {first[2]} on axis "
                    f"{first[1]}; the ONNX model declares both as the same size {dim!r}. Pass inputs from one "
                    "batch (e.g. input_ids and attention_mask from the same tokenizer call)."
                )


def input_values(declared: list[tuple[str, str, int, list[Any]]], inputs: Inputs) -> list[Any]:
    """The given inputs in the order the session declares them (by name, or flattened by position)."""
    names = [d[0] for d in declared]
    if isinstance(inputs, dict):
        if inputs.keys() != set(names):
            unknown = sorted(set(inputs) - set(names))
            missing = [n for n in names if n not in inputs]
            raise InvalidInputError(
                f"The ONNX model takes inputs {names}; got {sorted(inputs)} (missing {missing}, unknown {unknown})."
            )
        return [inputs[n] for n in names]
    values = list(flatten_tensors(inputs).values())
    # Exporters drop None and constant arguments, so those may be passed (and are skipped);
    # when the tensors then do not add up, say which arguments were not tensors.
    others = [f"input {i} is {type(v).__name__} {_short_repr(v)}" for i, v in enumerate(inputs)
              if v is not None and not isinstance(v, (torch.Tensor, tuple, list, dict))]
    if others and len(values) != len(declared):
        raise InvalidInputError(
            f"The ONNX model takes tensors {names}, but {'; '.join(others)}. Pass torch tensors "
            "(e.g. torch.tensor(...))."
        )
    if len(values) != len(declared):
        raise InvalidInputError(
            f"The ONNX model takes {len(declared)} inputs {names}; got {len(values)}: {describe(inputs)}."
        )
    return values


def make_feed(declared: list[tuple[str, str, int, list[Any]]], values: list[Any]) -> dict[str, np.ndarray]:
    """numpy arrays of the declared element types, each checked against its declared rank and sizes."""
    feed = {}
    for (name, kind, rank, shape), value in zip(declared, values):
        array = to_numpy(value, kind, name)
        if array.ndim != rank:
            raise InvalidInputError(
                f"Input {name!r} has rank {array.ndim} (shape {array.shape}), but the ONNX model expects "
                f"rank {rank} (shape {shape})."
            )
        wrong = [f"dimension {i} is {n}, expected {d}" for i, (n, d) in enumerate(zip(array.shape, shape))
                 if isinstance(d, int) and d >= 0 and n != d]
        if wrong:
            raise InvalidInputError(
                f"Input {name!r} has shape {tuple(array.shape)}, but the ONNX model expects shape {shape} "
                f"({'; '.join(wrong)})."
            )
        feed[name] = array
    return feed


def session_run(session: Any, feed: dict[str, np.ndarray], declared: list[tuple[str, str, int, list[Any]]]) -> Any:
    """``session.run``; inputs ONNX Runtime refuses, or a kernel fails on, become InvalidInputError."""
    try:
        return session.run(None, feed)
    except Exception as e:
        # InvalidArgument: ORT refused the inputs; Fail / RuntimeException: a kernel failed on
        # them (sizes that must agree but do not, e.g. a mask longer than the ids).
        if type(e).__name__ not in ("InvalidArgument", "Fail", "RuntimeException"):
            raise
        got = ", ".join(f"{n}: {tuple(a.shape)} {a.dtype}" for n, a in feed.items())
        verb = "refused" if type(e).__name__ == "InvalidArgument" else "failed running the model on"
        raise InvalidInputError(
            f"ONNX Runtime {verb} the inputs {{{got}}} (declared: "
            f"{', '.join(f'{n}: {shape}' for n, _, _, shape in declared)}): {str(e).strip().splitlines()[0]}. "
            "Check that sizes which must agree across inputs (batch, sequence) do."
        ) from e
