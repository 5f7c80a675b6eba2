"""Greedy decoding over a decoder step whose attention is ONNX Runtime's ``GroupQueryAttention``
(``Compile("onnxruntime")`` of an aigc_opt decoder export; passes/_decoder_fusions.py).

Such a graph keeps each row's tokens at the start of the cache (right padding) and writes the new
keys/values into a ``past`` buffer longer than the tokens in place. This loop preallocates one cache
buffer per layer and key/value for the whole generation (prompt + ``max_new_tokens``), binds each as
both the ``past`` input and the ``present`` output of the session (ONNX Runtime I/O binding), and so
copies no cache between steps: a step hands ONNX Runtime the new token ids and reads back the last
logits only. Prompts arrive left-padded (as transformers tokenizes for generation) and are moved to
the right here; the result is returned left-padded, as :func:`onnx_generation.greedy_generate` does.

Example:
    >>> fast = ao.compile(ao.quantize(ao.export(lm, "onnx"), method="int4-weight-only"), "onnxruntime")  # doctest: +SKIP
    >>> fast.generate(**tokenizer(["Hello"], return_tensors="pt"), max_new_tokens=16)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, InvalidInputError
from .onnx_generation import DecoderLayout, _as_int64, decoder_layout, generation_inputs, greedy_token

__all__ = ["DecoderLayout", "decoder_layout", "greedy_generate_bound", "right_padded_logits"]


def _to_right(ids: np.ndarray, mask: np.ndarray, pad: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(right-padded ids, their mask, real tokens per row) from a padded batch (either side)."""
    lengths = mask.sum(-1).astype(np.int64)
    if (lengths < 1).any():
        raise InvalidInputError("attention_mask has a row with no tokens; every prompt needs at least one.")
    right = np.full_like(ids, pad)
    right_mask = np.zeros_like(mask)
    for b in range(ids.shape[0]):
        right[b, :lengths[b]] = ids[b][mask[b] == 1]
        right_mask[b, :lengths[b]] = 1
    return right, right_mask, lengths


def right_padded_logits(artifact: Any, layout: DecoderLayout, input_ids: Any, attention_mask: Any) -> torch.Tensor:
    """Logits at every prompt position of a right-padding graph, returned at the caller's positions
    (padding positions get zeros)."""
    ids = _as_int64(input_ids, "input_ids")
    mask = np.ones_like(ids) if attention_mask is None else _as_int64(attention_mask, "attention_mask")
    right, right_mask, lengths = _to_right(ids, mask, 0)
    feed = _prefill_feed(layout, right, right_mask, cache_length=ids.shape[1])
    logits = artifact.session().run(["logits"], feed)[0]
    out = np.zeros_like(logits)
    for b in range(ids.shape[0]):
        out[b][mask[b] == 1] = logits[b, :lengths[b]]
    return torch.from_numpy(out).float()


def _prefill_feed(layout: DecoderLayout, ids: np.ndarray, mask: np.ndarray, cache_length: int) -> dict[str, Any]:
    empty = np.zeros((ids.shape[0], layout.kv_heads, cache_length, layout.head_dim), np.dtype(layout.cache_dtype))
    feed: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, **{n: empty for n in layout.past}}
    if layout.position_ids:
        feed["position_ids"] = np.zeros_like(ids)  # not read: GroupQueryAttention counts positions
    return feed


class _BoundCache:
    """The session's I/O binding with one preallocated cache buffer per past/present pair."""

    def __init__(self, session: Any, layout: DecoderLayout, batch: int, length: int):
        import onnxruntime as ort

        self.session, self.layout = session, layout
        self.binding = session.io_binding()
        self.binding.bind_output("logits")  # first: get_outputs() lists outputs in binding order
        shape = (batch, layout.kv_heads, length, layout.head_dim)
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.dtype(layout.cache_dtype)))
                        for _ in layout.past]
        for past, present, buffer in zip(layout.past, layout.present, self.buffers):
            self.binding.bind_ortvalue_input(past, buffer)
            self.binding.bind_ortvalue_output(present, buffer)

    def step(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Run one step; returns the logits (batch, new tokens, vocab)."""
        self.binding.bind_cpu_input("input_ids", ids)
        self.binding.bind_cpu_input("attention_mask", mask)
        if self.layout.position_ids:
            self.binding.bind_cpu_input("position_ids", np.zeros_like(ids))
        self.binding.bind_output("logits")  # unallocated again: its length changes after the prompt
        self.session.run_with_iobinding(self.binding)
        return self.binding.get_outputs()[0].numpy()


def greedy_generate_bound(artifact: Any, layout: DecoderLayout, input_ids: Any, attention_mask: Any = None, *,
                          max_new_tokens: int, min_new_tokens: int = 0, eos_token_id: int | list[int] | None = None,
                          pad_token_id: int | None = None) -> torch.Tensor:
    """Prompt ids followed by up to ``max_new_tokens`` greedy tokens (transformers' greedy semantics:
    ``min_new_tokens`` suppresses end-of-sequence, finished rows are padded), for a right-padding,
    shared-buffer decoder (``layout.shared_buffer``)."""
    ids, mask, eos, pad = generation_inputs(layout, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                            eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    right, right_mask, lengths = _to_right(ids, mask, pad)
    batch = ids.shape[0]
    length = int(lengths.max()) + max_new_tokens
    if layout.max_length is not None and length > layout.max_length:
        raise ConfigError(f"prompt ({int(lengths.max())} tokens) + max_new_tokens ({max_new_tokens}) = {length} "
                          f"exceeds the model's {layout.max_length} positions; generate fewer tokens.")
    cache = _BoundCache(artifact.session(), layout, batch, length)
    logits = cache.step(right, right_mask)
    scores = logits[np.arange(batch), lengths - 1]
    positions = np.arange(length)
    finished, new = np.zeros(batch, bool), []
    for step in range(max_new_tokens):
        token = greedy_token(scores, eos, pad, finished, suppress_eos=step < min_new_tokens)
        new.append(token)
        if finished.all() or step == max_new_tokens - 1:
            break
        lengths = lengths + 1
        width = int(lengths.max())
        step_mask = (positions[None, :width] < lengths[:, None]).astype(np.int64)
        scores = cache.step(token[:, None].astype(np.int64), step_mask)[:, -1]
    return torch.from_numpy(np.concatenate([ids, np.stack(new, axis=1)], axis=1))
