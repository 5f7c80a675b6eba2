"""Runtime for ``format="torch"``: an ``nn.Module`` (possibly wrapped by ``torch.compile``).

Besides running, it has the optional capabilities of runtime/base.py: greedy ``generate`` for
Hugging Face causal LMs (compiled forward included), ``next_token_logits`` and ``count_flops``.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .._tree import Inputs, map_tensors, normalize_inputs, split_inputs
from ..errors import UnsupportedModelError
from ._module_facts import (
    SAFETENSORS_METADATA,
    WeightsPlan,
    module_device,
    module_facts,
    plan_weights,
    safetensors_size,
    unwrap,
)
from ._torch_store import load_module, save_module
from .base import RUNTIMES, ModelFacts
from .exported_program import call_exported

__all__ = ["TorchModuleRuntime", "module_device", "unwrap", "module_facts", "WeightsPlan", "plan_weights",
           "safetensors_size", "SAFETENSORS_METADATA"]


class TorchModuleRuntime:
    # Saves have kept the torch format's entry (which file holds the weights, and how) under
    # "weights" since before runtimes stored their own formats: the field stays where it was.
    manifest_field = "weights"

    def save(self, artifact: Any, directory: Path, facts: ModelFacts | None = None) -> dict[str, Any]:
        """The weights (safetensors, or ``torch.save``) and a custom module's pickled structure;
        see :mod:`aigc_opt.runtime._torch_store`."""
        return save_module(artifact, directory, facts or ModelFacts())

    def load(self, directory: Path, meta: dict[str, Any] | None, *, files: dict[str, str], trust: bool = False,
             facts: ModelFacts | None = None) -> torch.nn.Module:
        """The module rebuilt from the recorded architecture with the history replayed and the
        weights loaded (``meta`` is the manifest's ``weights`` entry; empty for the oldest saves,
        which hold ``weights.pt``)."""
        module = load_module(directory, meta or None, files=files, trust=trust, facts=facts or ModelFacts())
        unwrap(module).eval()
        return module

    def run(self, artifact: Any, inputs: Inputs) -> Any:
        device = module_device(artifact)
        inputs = map_tensors(lambda t: t.to(device, non_blocking=True), inputs)
        args, kwargs = split_inputs(inputs)
        with torch.inference_mode():
            if isinstance(artifact, torch.fx.GraphModule):  # from torch.export (PT2E int8): shape guards
                return call_exported(artifact, args, kwargs)
            return artifact(*args, **kwargs)

    def device(self, artifact: Any) -> str:
        return str(module_device(artifact))

    def facts(self, artifact: Any, *, size: bool = True) -> dict[str, int]:
        return module_facts(artifact, size=size)

    # ------------------------------------------------------------------ optional capabilities
    def can_generate(self, artifact: Any) -> bool:
        return hasattr(unwrap(artifact), "generate")

    def generate(self, artifact: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
                 max_new_tokens: int, min_new_tokens: int, eos_token_id: int | list[int] | None,
                 pad_token_id: int | None) -> torch.Tensor:
        """transformers' greedy ``generate``, on the compiled forward when the model is compiled."""
        module = unwrap(artifact)
        if not hasattr(module, "generate"):
            raise UnsupportedModelError(
                f"{type(module).__name__} cannot generate: generation takes a Hugging Face causal LM "
                "(ao.Model.from_hf(path, task='causal-lm')) or its ONNX export."
            )
        device = module_device(module)
        # None would unset the model's own default, so only given ids are passed
        extra = {k: v for k, v in (("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)) if v is not None}
        if attention_mask is not None:
            extra["attention_mask"] = attention_mask.to(device)
        static = _static_decode(artifact, module)
        if static is not None:  # compiled once per (batch size, cache length bucket): no step recompiles
            extra.update(static, max_cache_len=cache_bucket(input_ids.shape[1] + max_new_tokens))
        with torch.inference_mode(), _count_compiles(artifact), _compiled_forward(artifact, module, static):
            return module.generate(input_ids=input_ids.to(device), **extra, max_new_tokens=max_new_tokens,
                                   min_new_tokens=min_new_tokens, do_sample=False, num_beams=1).cpu()

    def next_token_logits(self, artifact: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of one forward pass over left-padded sequences without a cache; a compiled model
        runs its plain module (same numbers, no recompilation for the shape)."""
        module = unwrap(artifact)
        device = module_device(module)
        kwargs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        if "position_ids" in inspect.signature(module.forward).parameters:
            from .onnx_generation import positions_from_mask

            kwargs["position_ids"] = torch.from_numpy(positions_from_mask(attention_mask.cpu().numpy())).to(device)
        with torch.inference_mode():
            out = module(**kwargs, use_cache=False)
        return (out.logits if hasattr(out, "logits") else out[0]).float().cpu()

    def count_flops(self, artifact: Any, batch: Any) -> int | None:
        """torch.utils.flop_counter over the plain module; None when nothing could be counted
        (quantized kernels are opaque to it)."""
        from torch.utils.flop_counter import FlopCounterMode

        try:
            with FlopCounterMode(display=False) as counter:
                self.run(unwrap(artifact), normalize_inputs(batch))
        except Exception:
            return None
        return int(counter.get_total_flops()) or None


# Static KV caches are allocated in buckets of these lengths (then doubling): a generate call compiles
# the decode step once per (batch size, bucket), and transformers keeps the largest bucket seen, so
# later shorter calls reuse it. Attention reads the whole bucket every step (masked), so buckets stay small.
CACHE_BUCKETS = (128, 256, 512, 1024, 2048)


def cache_bucket(length: int) -> int:
    """The static KV cache length for ``length`` positions (prompt + new tokens)."""
    bucket = next((b for b in CACHE_BUCKETS if b >= length), CACHE_BUCKETS[-1])
    while bucket < length:
        bucket *= 2
    return bucket


def _static_decode(artifact: Any, module: torch.nn.Module) -> dict[str, Any] | None:
    """generate() settings for a compiled decoder that transformers can run with a static KV cache:
    ``cache_implementation="static"`` and a ``CompileConfig`` with the Compile pass's options.

    transformers then runs the prefill eager and the one-token decode step compiled, every step with
    the same shapes (the cache is preallocated, positions are tensors), so the step is compiled once.
    None for an uncompiled model or one without static-cache support (it keeps ``_compiled_forward``)."""
    options = getattr(artifact, "compile_options", None) if artifact is not module else None
    if options is None or not getattr(module, "_can_compile_fullgraph", False):
        return None
    config = artifact.__dict__.get("decode_compile_config")
    if config is None:  # one object per compiled model: transformers recompiles when the config changes
        from transformers.generation.configuration_utils import CompileConfig

        config = CompileConfig(**{k: options[k] for k in ("backend", "mode", "dynamic", "fullgraph")})
        config._compile_all_devices = True  # transformers compiles only on accelerators unless told
        artifact.__dict__["decode_compile_config"] = config
    return {"cache_implementation": "static", "compile_config": config}


@contextlib.contextmanager
def _count_compiles(artifact: Any) -> Iterator[None]:
    """Counts what torch.compile built during one generate call into ``artifact.decode_stats``
    (graphs compiled, compile seconds, calls): a decode loop that recompiled per step shows up there."""
    from torch._dynamo.utils import compilation_time_metrics, counters

    def now() -> tuple[int, float]:
        return (counters["stats"]["unique_graphs"],
                sum(compilation_time_metrics.get("_compile.compile_inner", ())))

    graphs, seconds = now()
    try:
        yield
    finally:
        new_graphs, new_seconds = now()
        stats = artifact.__dict__.setdefault("decode_stats", {"calls": 0, "graphs_compiled": 0,
                                                              "compile_seconds": 0.0, "graphs_per_call": []})
        stats["calls"] += 1
        stats["graphs_compiled"] += new_graphs - graphs
        stats["compile_seconds"] = round(stats["compile_seconds"] + new_seconds - seconds, 3)
        stats["graphs_per_call"].append(new_graphs - graphs)


@contextlib.contextmanager
def _compiled_forward(artifact: Any, module: torch.nn.Module, static: dict[str, Any] | None = None) -> Iterator[None]:
    """While generating, a compiled model's forward runs compiled.

    transformers' generate calls ``module.forward`` on the plain module, which a torch.compile
    wrapper does not replace; without this, generating from ``Compile("inductor")``'s output would
    run eager. The forward is compiled once per compiled model, with the Compile pass's options.
    With a static cache (``static``), transformers compiles the decode step itself and this does nothing.
    """
    options = getattr(artifact, "compile_options", None) if artifact is not module else None
    if options is None or static is not None:
        yield
        return
    compiled = artifact.__dict__.get("generate_forward")
    if compiled is None:  # kept on the compiled wrapper: it lives exactly as long as the compiled model
        compiled = artifact.__dict__["generate_forward"] = torch.compile(module.forward, **options)
    module.forward = compiled
    try:
        yield
    finally:
        del module.forward  # the class's forward again


RUNTIMES.register("torch", TorchModuleRuntime())
