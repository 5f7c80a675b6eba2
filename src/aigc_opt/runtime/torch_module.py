"""Runtime for ``format="torch"``: an ``nn.Module`` (possibly wrapped by ``torch.compile``)."""

from __future__ import annotations

import io
from typing import Any

import torch

from .._tree import Inputs, map_tensors, split_inputs
from .base import RUNTIMES

__all__ = ["TorchModuleRuntime", "module_device", "unwrap", "module_facts"]


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


def module_facts(module: torch.nn.Module, *, size: bool = True) -> dict[str, int]:
    """Parameters (logical elements), bytes of weights and buffers in memory (quantized storage
    counted as stored, shared storage once), and bytes of the saved state dict."""
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
        counter = _ByteCounter()
        torch.save(module.state_dict(), counter)
        facts["size_bytes"] = counter.count
    return facts


class TorchModuleRuntime:
    def run(self, artifact: Any, inputs: Inputs) -> Any:
        device = module_device(artifact)
        inputs = map_tensors(lambda t: t.to(device, non_blocking=True), inputs)
        args, kwargs = split_inputs(inputs)
        with torch.inference_mode():
            return artifact(*args, **kwargs)

    def device(self, artifact: Any) -> str:
        return str(module_device(artifact))

    def facts(self, artifact: Any, *, size: bool = True) -> dict[str, int]:
        return module_facts(artifact, size=size)

    # Saving a torch module needs its architecture spec and pass replay: Model.save does it.


RUNTIMES.register("torch", TorchModuleRuntime())
