"""Greedy generation over an ONNX causal-LM decoder step exported with its KV cache.

``Export("onnx")`` of a Hugging Face causal LM gives a graph that takes the cache as tensors and
returns it grown (see :mod:`aigc_opt.passes._export_decoder`). This loop feeds it: the prompt
once with an empty cache, then one token per step, keeping everything in numpy between steps.
It follows transformers' greedy ``generate`` semantics: left-padded prompts, positions counted
from the attention mask, ``min_new_tokens`` suppressing end-of-sequence, finished rows padded.

Example:
    >>> onnx_lm = ao.export(ao.Model.from_hf(path, task="causal-lm"), "onnx")   # doctest: +SKIP
    >>> ids = onnx_lm.generate(**tokenizer(["Hello"], return_tensors="pt"), max_new_tokens=16)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, IntegrityError, InvalidInputError, UnsupportedModelError

__all__ = ["DecoderLayout", "decoder_layout", "greedy_generate", "prefill_feed", "positions_from_mask"]

log = logging.getLogger("aigc_opt")

KV_CACHE_META_KEY = "aigc_opt.kv_cache"  # written by passes/_decoder_fusions.py on fused graphs


@dataclass(frozen=True)
class DecoderLayout:
    """How a decoder step's KV cache is fed, for both decode loops: the export's layout (stored as the
    plain dict ``OnnxArtifact.generation``, which is also what a save writes to ``manifest.json``) plus,
    for graphs ``Compile("onnxruntime")`` fused into ``GroupQueryAttention``, the cache contract the
    graph declares in its metadata (``padding``, ``shared_buffer``, ``max_length``).

    Example:
        >>> layout = DecoderLayout.from_generation({"layers": 1, "kv_heads": 2, "head_dim": 8,
        ...     "cache_dtype": "float32", "past": ["past.0.key", "past.0.value"],
        ...     "present": ["present.0.key", "present.0.value"], "position_ids": True})
        >>> layout.padding, layout.shared_buffer
        ('left', False)
    """

    layers: int
    kv_heads: int
    head_dim: int
    cache_dtype: str
    past: tuple[str, ...]
    present: tuple[str, ...]
    position_ids: bool
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None
    padding: str = "left"  # "right": rows' tokens start at cache position 0 (GroupQueryAttention)
    shared_buffer: bool = False  # a past longer than the tokens is written in place
    max_length: int | None = None

    @classmethod
    def from_generation(cls, generation: Any, kv_cache: dict[str, Any] | None = None) -> DecoderLayout:
        """The layout from an export's ``generation`` dict (any save made since decoders were exported
        with their cache) and a fused graph's ``kv_cache`` metadata; a malformed one raises
        :class:`IntegrityError` naming the key."""
        if isinstance(generation, DecoderLayout):
            return generation
        g, kv = generation if isinstance(generation, dict) else {}, kv_cache or {}
        try:
            eos = g.get("eos_token_id")
            layout = cls(layers=_count(g["layers"]), kv_heads=_count(g["kv_heads"]), head_dim=_count(g["head_dim"]),
                         cache_dtype=_names([g["cache_dtype"]])[0], past=_names(g["past"]),
                         present=_names(g["present"]), position_ids=_flag(g["position_ids"]),
                         eos_token_id=tuple(_count(e, 0) for e in ([eos] if isinstance(eos, int) else eos or ())),
                         pad_token_id=None if g.get("pad_token_id") is None else _count(g["pad_token_id"], 0),
                         padding=str(kv.get("padding", "left")), shared_buffer=_flag(kv.get("shared_buffer", False)),
                         max_length=None if kv.get("max_length") is None else _count(kv["max_length"]))
        except (KeyError, TypeError, ValueError) as e:
            raise IntegrityError(f"A decoder's KV-cache layout is malformed ({type(e).__name__}: {e}); expected the "
                                 "dict Export('onnx') records (layers, kv_heads, head_dim, cache_dtype, past, present, "
                                 f"position_ids), got {generation!r:.200}. Re-export the model.") from None
        if len(layout.past) != len(layout.present) or layout.padding not in ("left", "right"):
            raise IntegrityError(f"A decoder's KV-cache layout is inconsistent: {len(layout.past)} past and "
                                 f"{len(layout.present)} present tensors, padding {layout.padding!r}. Re-export the model.")
        return layout

    def to_generation(self) -> dict[str, Any]:
        """The export's dict (``OnnxArtifact.generation``, the manifest's form) this layout was read from."""
        return {"layers": self.layers, "kv_heads": self.kv_heads, "head_dim": self.head_dim,
                "cache_dtype": self.cache_dtype, "past": list(self.past), "present": list(self.present),
                "position_ids": self.position_ids, "eos_token_id": list(self.eos_token_id),
                "pad_token_id": self.pad_token_id}


def _count(value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{value!r} is not an int >= {low}")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{value!r} is not a bool")
    return value


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{value!r:.80} is not a list of tensor names")
    return tuple(value)


def decoder_layout(artifact: Any) -> DecoderLayout | None:
    """The artifact's :class:`DecoderLayout` (None: not a decoder step): its ``generation`` dict and, for
    a fused graph, the metadata read from its (cached) session."""
    if artifact.generation is None:
        return None
    meta = artifact.session().get_modelmeta().custom_metadata_map.get(KV_CACHE_META_KEY)
    return DecoderLayout.from_generation(artifact.generation, json.loads(meta) if meta else None)


def _as_int64(value: Any, name: str) -> np.ndarray:
    array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if array.ndim != 2 or array.dtype.kind not in "iub":
        raise InvalidInputError(f"{name} must be a 2-D integer tensor (batch, length), got shape "
                                f"{tuple(array.shape)} dtype {array.dtype}.")
    return array.astype(np.int64)


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """transformers' rule for left-padded batches: a token's position is the number of real
    tokens before it; pads get 1 (unused)."""
    return np.where(mask == 1, mask.cumsum(-1) - 1, 1)


def prefill_feed(layout: DecoderLayout | dict[str, Any], input_ids: Any,
                 attention_mask: Any = None) -> dict[str, np.ndarray]:
    """The decoder step's inputs for a prompt batch: the ids, the mask, positions, an empty cache
    (``layout``: a :class:`DecoderLayout` or the export's ``generation`` dict).

    Also how prompt batches become calibration batches for ``Quantize("int8-static")``."""
    layout = DecoderLayout.from_generation(layout)
    ids = _as_int64(input_ids, "input_ids")
    mask = np.ones_like(ids) if attention_mask is None else _as_int64(attention_mask, "attention_mask")
    if mask.shape != ids.shape:
        raise InvalidInputError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}: they must match.")
    empty = np.zeros((ids.shape[0], layout.kv_heads, 0, layout.head_dim), np.dtype(layout.cache_dtype))
    feed = {"input_ids": ids, "attention_mask": mask, **{name: empty for name in layout.past}}
    if layout.position_ids:
        feed["position_ids"] = positions_from_mask(mask)
    return feed


def generation_inputs(layout: DecoderLayout, input_ids: Any, attention_mask: Any, *, max_new_tokens: int,
                      eos_token_id: int | list[int] | None,
                      pad_token_id: int | None) -> tuple[np.ndarray, np.ndarray, list[int], int]:
    """What both greedy loops start from, checked: the prompt's int64 ids and mask (all ones by
    default), the end-of-sequence ids and the pad id (the export's unless given; else the first
    end-of-sequence id, else 0)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    ids = _as_int64(input_ids, "input_ids")
    mask = np.ones_like(ids) if attention_mask is None else _as_int64(attention_mask, "attention_mask")
    if mask.shape != ids.shape:
        raise InvalidInputError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}: they must match.")
    eos = list(layout.eos_token_id) if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = layout.pad_token_id if pad_token_id is None else pad_token_id
    return ids, mask, eos, (eos[0] if eos else 0) if pad is None else pad


def greedy_token(scores: np.ndarray, eos: list[int], pad: int, finished: np.ndarray, *,
                 suppress_eos: bool) -> np.ndarray:
    """The next token of each row (transformers' greedy semantics): the arg-max of ``scores``, with
    end-of-sequence ids suppressed while ``suppress_eos`` (``min_new_tokens`` not reached yet), and
    ``pad`` for rows already ``finished``; marks rows that end now in ``finished``."""
    scores = scores.astype(np.float32)  # a copy: the caller's logits are left as they are
    if eos and suppress_eos:
        scores[:, eos] = -np.inf
    token = scores.argmax(-1)
    if eos:
        token = np.where(finished, pad, token)
        finished |= np.isin(token, eos)
    return token


def greedy_generate(artifact: Any, input_ids: Any, attention_mask: Any = None, *, max_new_tokens: int,
                    min_new_tokens: int = 0, eos_token_id: int | list[int] | None = None,
                    pad_token_id: int | None = None) -> torch.Tensor:
    """Prompt ids followed by up to ``max_new_tokens`` greedy tokens, as transformers returns them.

    Args:
        artifact: an ``OnnxArtifact`` whose ``generation`` layout is set (Export of a causal LM).
        input_ids, attention_mask: the (left-padded) prompt batch; mask defaults to all ones.
        eos_token_id, pad_token_id: default to the ids recorded at export.
    """
    layout = decoder_layout(artifact)
    if layout is None:
        raise UnsupportedModelError(
            "This ONNX model is not a decoder step with a KV cache, so it cannot generate: export the causal "
            "LM with ao.export(model, 'onnx') (kv_cache is on by default for models with generate())."
        )
    ids, mask, eos, pad = generation_inputs(layout, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                            eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if (mask[:, -1] == 0).any():
        log.warning("Model.generate: the prompt batch is right-padded (attention_mask ends in 0), so new tokens "
                    "follow padding; tokenize with tokenizer.padding_side = 'left'.")
    session = artifact.session()
    batch = ids.shape[0]
    outputs = ["logits", *layout.present]
    feed = prefill_feed(layout, ids, mask)
    positions = feed.get("position_ids")
    finished, new = np.zeros(batch, bool), []
    for step in range(max_new_tokens):
        logits, *present = session.run(outputs, feed)
        token = greedy_token(logits[:, -1], eos, pad, finished, suppress_eos=step < min_new_tokens)
        new.append(token)
        if finished.all():
            break
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        feed = {"input_ids": token[:, None], "attention_mask": mask, **dict(zip(layout.past, present))}
        if positions is not None:
            positions = positions[:, -1:] + 1
            feed["position_ids"] = positions
    return torch.from_numpy(np.concatenate([ids, np.stack(new, axis=1)], axis=1))
