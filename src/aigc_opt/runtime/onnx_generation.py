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

import logging
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, InvalidInputError, UnsupportedModelError

__all__ = ["greedy_generate", "prefill_feed", "positions_from_mask"]

log = logging.getLogger("aigc_opt")


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


def prefill_feed(layout: dict[str, Any], input_ids: Any, attention_mask: Any = None) -> dict[str, np.ndarray]:
    """The decoder step's inputs for a prompt batch: the ids, the mask, positions, an empty cache.

    Also how prompt batches become calibration batches for ``Quantize("int8-static")``."""
    ids = _as_int64(input_ids, "input_ids")
    mask = np.ones_like(ids) if attention_mask is None else _as_int64(attention_mask, "attention_mask")
    if mask.shape != ids.shape:
        raise InvalidInputError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}: they must match.")
    empty = np.zeros((ids.shape[0], layout["kv_heads"], 0, layout["head_dim"]), np.dtype(layout["cache_dtype"]))
    feed = {"input_ids": ids, "attention_mask": mask, **{name: empty for name in layout["past"]}}
    if layout["position_ids"]:
        feed["position_ids"] = positions_from_mask(mask)
    return feed


def greedy_generate(artifact: Any, input_ids: Any, attention_mask: Any = None, *, max_new_tokens: int,
                    min_new_tokens: int = 0, eos_token_id: int | list[int] | None = None,
                    pad_token_id: int | None = None) -> torch.Tensor:
    """Prompt ids followed by up to ``max_new_tokens`` greedy tokens, as transformers returns them.

    Args:
        artifact: an ``OnnxArtifact`` whose ``generation`` layout is set (Export of a causal LM).
        input_ids, attention_mask: the (left-padded) prompt batch; mask defaults to all ones.
        eos_token_id, pad_token_id: default to the ids recorded at export.
    """
    layout = artifact.generation
    if layout is None:
        raise UnsupportedModelError(
            "This ONNX model is not a decoder step with a KV cache, so it cannot generate: export the causal "
            "LM with ao.export(model, 'onnx') (kv_cache is on by default for models with generate())."
        )
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}.")
    ids = _as_int64(input_ids, "input_ids")
    mask = np.ones_like(ids) if attention_mask is None else _as_int64(attention_mask, "attention_mask")
    if mask.shape != ids.shape:
        raise InvalidInputError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}: they must match.")
    if (mask[:, -1] == 0).any():
        log.warning("Model.generate: the prompt batch is right-padded (attention_mask ends in 0), so new tokens "
                    "follow padding; tokenize with tokenizer.padding_side = 'left'.")
    eos = layout["eos_token_id"] if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = layout["pad_token_id"] if pad_token_id is None else pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    session = artifact.session()
    batch = ids.shape[0]
    outputs = ["logits", *layout["present"]]
    feed = prefill_feed(layout, ids, mask)
    positions = feed.get("position_ids")
    finished, new = np.zeros(batch, bool), []
    for step in range(max_new_tokens):
        logits, *present = session.run(outputs, feed)
        scores = logits[:, -1].astype(np.float32)
        if eos and step < min_new_tokens:
            scores[:, eos] = -np.inf
        token = scores.argmax(-1)
        if eos:
            token = np.where(finished, pad, token)
            finished |= np.isin(token, eos)
        new.append(token)
        if finished.all():
            break
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        feed = {"input_ids": token[:, None], "attention_mask": mask, **dict(zip(layout["past"], present))}
        if positions is not None:
            positions = positions[:, -1:] + 1
            feed["position_ids"] = positions
    return torch.from_numpy(np.concatenate([ids, np.stack(new, axis=1)], axis=1))
