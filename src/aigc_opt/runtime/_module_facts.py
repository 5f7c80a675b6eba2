"""What a plain ``nn.Module`` holds: its device, parameters, bytes in memory and the weights file
``Model.save`` would write. A leaf under the torch and torch.export runtimes (both describe
modules; neither imports the other for it)."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["module_device", "unwrap", "module_facts", "WeightsPlan", "plan_weights", "safetensors_size",
           "SAFETENSORS_METADATA"]


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The plain module under a ``torch.compile`` wrapper (OptimizedModule keeps it as _orig_mod)."""
    return getattr(module, "_orig_mod", module)


def module_device(module: torch.nn.Module) -> torch.device:
    for tensor in (*unwrap(module).parameters(), *unwrap(module).buffers()):
        return tensor.device
    return torch.device("cpu")


def _storage_leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Plain tensors holding a (possibly subclassed, e.g. int8-quantized) tensor's data."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [leaf for n in names for leaf in _storage_leaves(getattr(tensor, n))]


class _ByteCounter(io.RawIOBase):
    """A write-only sink that counts bytes (to size a save without writing it)."""

    def __init__(self) -> None:
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = len(memoryview(b).cast("B"))
        self.count += n
        return n


# The dtypes safetensors stores, by its own names (anything else is saved with torch.save).
_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.complex64: "C64",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"),
                     ("float8_e4m3fnuz", "F8_E4M3FNUZ"), ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
                     ("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _SAFETENSORS_DTYPES[getattr(torch, _name)] = _code

# The order in which safetensors lays tensors out in a file (its dtypes, widest first).
_SAFETENSORS_ORDER = {code: i for i, code in enumerate((
    "U64", "I64", "F64", "C64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16",
    "F8_E5M2FNUZ", "F8_E4M3FNUZ", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"))}

SAFETENSORS_METADATA = {"format": "pt"}  # what transformers writes: these are PyTorch tensors


@dataclass(frozen=True)
class WeightsPlan:
    """How a state dict is written: ``"safetensors"`` (every entry a plain dense tensor) or
    ``"torch.save"`` (anything else, e.g. torchao's quantized tensor subclasses), and why."""

    format: str
    reason: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # safetensors: each storage once
    aliases: dict[str, str] = field(default_factory=dict)  # safetensors: tied name -> name stored


def _span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes a (possibly strided) tensor can touch: [first, last + 1)."""
    extent = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()


def _not_safetensors(name: str, value: Any) -> str | None:
    """Why ``value`` cannot go into a safetensors file, or None if it can."""
    if not isinstance(value, torch.Tensor):
        return f"{name!r} is a {type(value).__name__}, not a tensor"
    if type(value) not in (torch.Tensor, torch.nn.Parameter):
        return (f"{name!r} is a tensor subclass ({type(value).__name__}, e.g. torchao's quantized "
                "weights), which safetensors cannot store")
    if value.layout != torch.strided:
        return f"{name!r} has layout {value.layout}, and safetensors stores dense tensors only"
    if value.is_quantized:
        return f"{name!r} is a torch quantized tensor ({value.dtype}), which safetensors cannot store"
    if value.dtype not in _SAFETENSORS_DTYPES:
        return f"{name!r} has dtype {value.dtype}, which safetensors does not store"
    if value.device.type == "meta":
        return f"{name!r} is on the meta device (it has no data)"
    return None


def plan_weights(state: Mapping[str, Any]) -> WeightsPlan:
    """Decide how ``state`` (a state dict) is saved: safetensors when every entry is a plain
    tensor, each storage written once (tied weights, e.g. a language model's embedding and
    output layer, become ``aliases``); torch.save otherwise, with the first reason found."""
    for name, value in state.items():
        reason = _not_safetensors(name, value)
        if reason is not None:
            return WeightsPlan("torch.save", reason)
    by_storage: dict[tuple[Any, int], list[str]] = {}
    for name, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr:
            by_storage.setdefault((t.device, ptr), []).append(name)
    aliases: dict[str, str] = {}
    for names in by_storage.values():
        if len(names) < 2:
            continue
        views: dict[tuple[Any, ...], str] = {}
        for name in names:
            t = state[name]
            key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
            if key in views:
                aliases[name] = views[key]  # the same tensor under a second name
            else:
                views[key] = name
        spans = sorted((*_span(state[n]), n) for n in views.values())
        for (_, end, first), (start, _, second) in zip(spans, spans[1:]):
            if start < end:  # different views of shared memory: only torch.save keeps them shared
                return WeightsPlan("torch.save", f"{first!r} and {second!r} are overlapping views of one "
                                                 "storage, which safetensors cannot express")
    tensors = {k: v for k, v in state.items() if k not in aliases}
    reason = "every entry is a plain tensor"
    if aliases:
        reason += f"; {len(aliases)} tied name(s) stored once"
    return WeightsPlan("safetensors", reason, tensors, aliases)


def safetensors_size(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> int:
    """Bytes of the safetensors file of ``tensors`` without writing it: 8 + JSON header padded to
    8 + data."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0

    def layout(item: tuple[str, torch.Tensor]) -> tuple[int, str]:  # as safetensors: dtype, then name
        return _SAFETENSORS_ORDER.get(_SAFETENSORS_DTYPES[item[1].dtype], len(_SAFETENSORS_ORDER)), item[0]

    for name, t in sorted(tensors.items(), key=layout):  # the order changes the offsets' digits
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = len(json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode())
    return 8 + head + (-head % 8) + offset


def module_facts(module: torch.nn.Module, *, size: bool = True) -> dict[str, int]:
    """Parameters (logical elements), bytes of weights and buffers in memory (quantized storage
    counted as stored, shared storage once), and bytes of the saved weights file (safetensors or
    torch.save, as :meth:`Model.save` would write it)."""
    module = unwrap(module)
    seen: set[int] = set()
    memory = 0
    for tensor in (*module.parameters(), *module.buffers()):
        for leaf in _storage_leaves(tensor):
            storage = leaf.untyped_storage()
            key = storage.data_ptr() if storage.data_ptr() else id(storage)
            if key not in seen:
                seen.add(key)
                memory += storage.nbytes()
    facts = {"num_parameters": sum(p.numel() for p in module.parameters()), "memory_bytes": memory}
    if size:
        state = module.state_dict()
        plan = plan_weights(state)
        if plan.format == "safetensors":
            facts["size_bytes"] = safetensors_size(plan.tensors, SAFETENSORS_METADATA)
        else:
            counter = _ByteCounter()
            torch.save(state, counter)
            facts["size_bytes"] = counter.count
    return facts
