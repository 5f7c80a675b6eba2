"""ONNX export of a Hugging Face causal LM as a decoder step with its KV cache.

The graph takes ``input_ids``, ``attention_mask`` (past + new positions), ``position_ids`` and
one ``past.{layer}.key`` / ``past.{layer}.value`` tensor per layer, and returns ``logits`` and
the grown ``present.{layer}.key`` / ``.value``. One graph serves both phases: the prompt (past
of length 0) and each new token (past of the tokens so far), so generation costs one
token's work per step, not the whole sequence's. ``artifact.generation`` records the layout;
:mod:`aigc_opt.runtime.onnx_generation` drives it.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError, UnsupportedModelError
from ..runtime.torch_module import unwrap
from .base import PassResult

if TYPE_CHECKING:
    from ..model import Model
    from .export import Export

__all__ = ["is_causal_lm", "export_decoder", "DECODER_WRAPPER", "DECODER_ATTRIBUTE"]

# The traced wrapper, as the exporter names it in each node's class hierarchy, and the attribute
# holding the user's model: module paths in the graph start with it ("lm.lm_head").
DECODER_WRAPPER = "aigc_opt.passes._export_decoder._DecoderStep"
DECODER_ATTRIBUTE = "lm"

# Trace sizes: all different and >= 2, so torch.export keeps batch, new and past lengths symbolic
# and separate (it specializes sizes 0 and 1, and unifies equal ones).
_TRACE_BATCH, _TRACE_NEW, _TRACE_PAST = 2, 3, 4


def is_causal_lm(module: torch.nn.Module) -> bool:
    """A transformers decoder-only model that generates (GPT2LMHeadModel, LlamaForCausalLM, ...)."""
    module = unwrap(module)
    config = getattr(module, "config", None)
    can_generate = getattr(module, "can_generate", None)
    return (config is not None and callable(can_generate) and bool(can_generate())
            and not getattr(config, "is_encoder_decoder", False))


class _DecoderStep(torch.nn.Module):
    """The causal LM called with its cache as flat tensors in, flat tensors out (ONNX has no cache type)."""

    def __init__(self, lm: torch.nn.Module, layers: int, takes_positions: bool):
        super().__init__()
        self.lm, self.layers, self.takes_positions = lm, layers, takes_positions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache()
        for i in range(self.layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        extra = {"position_ids": position_ids} if self.takes_positions else {}
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                      return_dict=True, **extra)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def _cache_layout(lm: torch.nn.Module, input_ids: torch.Tensor) -> tuple[int, list[int], torch.dtype]:
    """(layers, [kv heads, head dim], dtype) read from one real forward, not from config names
    (which differ across architectures)."""
    with torch.inference_mode():
        out = lm(input_ids=input_ids[:1, :2], use_cache=True, return_dict=True)
    layers = getattr(out.past_key_values, "layers", None)
    if not layers or any(getattr(layer, "keys", None) is None for layer in layers):
        raise UnsupportedModelError(
            f"Export(kv_cache=True): {type(lm).__name__} returned no per-layer key/value cache "
            f"({type(out.past_key_values).__name__}); export it with kv_cache=False (the graph then "
            "recomputes the whole sequence at every step)."
        )
    keys = layers[0].keys
    if keys.dim() != 4:
        raise UnsupportedModelError(f"Export(kv_cache=True): cache tensors of shape {tuple(keys.shape)} are not "
                                    "(batch, heads, length, head_dim); export with kv_cache=False.")
    return len(layers), [int(keys.shape[1]), int(keys.shape[3])], keys.dtype


def _token_ids(inputs: Any) -> torch.Tensor:
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else (inputs[0] if isinstance(inputs, tuple) else inputs)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
        raise UnsupportedModelError(
            "Export(kv_cache=True) needs example inputs with 2-D integer input_ids (a tokenized prompt); "
            f"got {type(ids).__name__}."
        )
    return ids


def export_decoder(model: Model, settings: Export) -> PassResult:
    from ..runtime.onnxruntime import OnnxArtifact
    from ._export_common import dynamo_export, external_data_for, onnx_opset, verify_outputs

    lm = unwrap(model.artifact)
    if settings.dynamic is not True:
        raise ConfigError("Export(kv_cache=True) needs dynamic=True: batch, prompt and cache lengths change "
                          f"during generation; got dynamic={settings.dynamic!r}.")
    ids = _token_ids(model.example_inputs)
    layers, (heads, head_dim), dtype = _cache_layout(lm, ids)
    takes_positions = "position_ids" in inspect.signature(lm.forward).parameters
    step = _DecoderStep(lm, layers, takes_positions).eval()
    past_names = [f"past.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present_names = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    vocab = int(lm.get_output_embeddings().weight.shape[0]) if lm.get_output_embeddings() is not None else None
    trace = _feed(torch.randint(0, vocab or 2, (_TRACE_BATCH, _TRACE_NEW)), _TRACE_PAST, heads, head_dim, dtype,
                  layers)
    batch, new, past = (torch.export.Dim(n) for n in ("batch", "sequence", "past_sequence"))
    dynamic_shapes = {"input_ids": {0: batch, 1: new}, "attention_mask": {0: batch, 1: torch.export.Dim.AUTO},
                      "position_ids": {0: batch, 1: new}, "past": [{0: batch, 2: past}] * len(past_names)}
    external = external_data_for(settings, lm)
    path = dynamo_export(
        step, (trace["input_ids"], trace["attention_mask"], trace["position_ids"], trace["past"]),
        dynamic_shapes=dynamic_shapes, input_names=["input_ids", "attention_mask", "position_ids", *past_names],
        output_names=["logits", *present_names], settings=settings, external=external,
        what=f"{model.name} with its KV cache",
        hint="Export with kv_cache=False, or keep the model in torch (Compile('inductor')).")
    takes_positions, attention = _annotate(lm, path, takes_positions, heads, head_dim)
    generation = {"layers": layers, "kv_heads": heads, "head_dim": head_dim,
                  "cache_dtype": str(dtype).removeprefix("torch."), "past": past_names, "present": present_names,
                  "position_ids": takes_positions, **_special_tokens(lm)}
    artifact = OnnxArtifact(path=path, owns_dir=True, generation=generation)
    # What later passes (calibration, fusion checks, compare) run the graph on: the user's prompt
    # as a prefill step (empty cache).
    example = _feed(ids, 0, heads, head_dim, dtype, layers)
    flat_example = _flat(example, past_names, takes_positions)
    details: dict[str, Any] = {"exporter": "torch.onnx.export(dynamo=True), decoder step with KV cache",
                               "opset": onnx_opset(path), "external_data": external, "kv_cache": generation,
                               "attention_fusable": attention["fusable"] or attention["reason"]}
    if settings.verify:
        details["max_abs_diff"] = _verify(step, artifact, ids, layers, heads, head_dim, dtype, settings,
                                          past_names, takes_positions, verify_outputs)
    return PassResult(artifact, details, example_inputs=flat_example)


def _annotate(lm: torch.nn.Module, path: Any, takes_positions: bool, heads: int,
              head_dim: int) -> tuple[bool, dict[str, Any]]:
    """Whether the graph kept ``position_ids`` (the exporter drops an unused input: the runtime must not
    feed it), and what Compile('onnxruntime') needs to fuse each layer's attention into
    GroupQueryAttention, written into the graph's metadata (the projections' tensors are found
    here, while the graph still names its modules). The graph is read with onnx-ir and written back in
    place: weights stored beside it are not read, they keep their external-data references."""
    import onnx_ir as ir

    from ._decoder_fusions import DECODER_META_KEY, attention_metadata, set_metadata

    exported = ir.load(str(path))
    takes_positions = takes_positions or "position_ids" in [i.name for i in exported.graph.inputs]
    heads_q = int(getattr(lm.config, "num_attention_heads", 0) or 0)
    attention = attention_metadata(lm, exported, heads_q, heads, head_dim)
    set_metadata(exported, DECODER_META_KEY, attention)
    ir.save(exported, str(path))
    return takes_positions, attention


def _feed(ids: torch.Tensor, past_len: int, heads: int, head_dim: int, dtype: torch.dtype,
          layers: int) -> dict[str, Any]:
    batch, new = ids.shape
    mask = torch.ones(batch, past_len + new, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask,
            "position_ids": torch.arange(past_len, past_len + new).expand(batch, new).contiguous(),
            "past": [torch.randn(batch, heads, past_len, head_dim).to(dtype) for _ in range(2 * layers)]}


def _flat(feed: dict[str, Any], past_names: list[str], takes_positions: bool) -> dict[str, torch.Tensor]:
    flat = {k: v for k, v in feed.items() if k != "past" and (k != "position_ids" or takes_positions)}
    flat.update(zip(past_names, feed["past"]))
    return flat


def _verify(step: torch.nn.Module, artifact: Any, ids: torch.Tensor, layers: int, heads: int, head_dim: int,
            dtype: torch.dtype, settings: Export, past_names: list[str], takes_positions: bool,
            verify_outputs: Any) -> dict[str, float]:
    """The ONNX step against torch on both phases: the prompt with an empty cache, then one token
    with the cache the prompt made."""
    from ..runtime import runtime_for

    run = runtime_for("onnx").run
    diffs: dict[str, float] = {}
    prompt = _feed(ids, 0, heads, head_dim, dtype, layers)
    with torch.inference_mode():
        expected = step(prompt["input_ids"], prompt["attention_mask"], prompt["position_ids"], prompt["past"])
    got = run(artifact, _flat(prompt, past_names, takes_positions))
    diffs["prefill"] = max(verify_outputs(expected, got, atol=settings.atol, rtol=settings.rtol,
                                          what="The ONNX decoder (prompt step)").values())
    batch, length = ids.shape
    following = {"input_ids": ids[:, -1:], "attention_mask": torch.ones(batch, length + 1, dtype=torch.long),
                 "position_ids": torch.full((batch, 1), length, dtype=torch.long), "past": list(expected[1:])}
    with torch.inference_mode():
        expected = step(following["input_ids"], following["attention_mask"], following["position_ids"],
                        following["past"])
    got = run(artifact, _flat(following, past_names, takes_positions))
    diffs["decode"] = max(verify_outputs(expected, got, atol=settings.atol, rtol=settings.rtol,
                                         what="The ONNX decoder (next-token step)").values())
    return diffs


def _special_tokens(lm: torch.nn.Module) -> dict[str, Any]:
    config = getattr(lm, "generation_config", None) or lm.config
    eos = getattr(config, "eos_token_id", None)
    pad = getattr(config, "pad_token_id", None)
    return {"eos_token_id": list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [int(eos)]),
            "pad_token_id": None if pad is None else int(pad)}
