"""Fidelity of a causal LM on real text: teacher-forced next-token agreement and perplexity.

Free-running greedy agreement compounds (one flipped near-tie changes every later token), so an
LLM's fidelity is measured teacher-forced: every model reads the same text, and at each position
its top-1 next token is compared with the reference model's; perplexity is measured on the same
positions against the text itself. Text that ships with aigc_opt (``heldout_text()``, Python
standard-library docstrings) keeps the numbers reproducible offline.

Example:
    >>> from aigc_opt.bench.llm import heldout_text, text_windows, text_scores, agreement  # doctest: +SKIP
    >>> ids = text_windows(lm.tokenizer, heldout_text(), window=256, count=2)                # doctest: +SKIP
    >>> ref, q = text_scores(lm, ids), text_scores(q4, ids)                                   # doctest: +SKIP
    >>> agreement(ref, q), ref.perplexity, q.perplexity                                        # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import torch

from ..errors import ConfigError
from .generation import next_token_logits

if TYPE_CHECKING:
    from ..model import Model

__all__ = ["heldout_text", "text_windows", "TextScores", "text_scores", "agreement"]

HELDOUT = "llm_heldout.txt"


def heldout_text() -> str:
    """About 24,000 characters of Python standard-library docstrings (heapq, fractions, statistics,
    contextlib, string, shutil, dataclasses, functools) shipped with aigc_opt: real English and code
    no model was tuned on here, readable offline."""
    return resources.files("aigc_opt").joinpath("data", HELDOUT).read_text(encoding="utf-8")


def text_windows(tokenizer: Any, text: str, *, window: int = 256, count: int = 4) -> torch.Tensor:
    """``count`` consecutive, non-overlapping windows of ``window`` tokens of ``text``: (count, window) ids."""
    if window < 2 or count < 1:
        raise ConfigError(f"text_windows: window must be >= 2 and count >= 1, got window={window}, count={count}.")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    need = window * count
    if ids.numel() < need:
        raise ConfigError(f"text_windows: the text has {ids.numel()} tokens, {count} windows of {window} need {need}; "
                          "give a longer text or fewer/smaller windows.")
    return ids[:need].reshape(count, window).contiguous()


@dataclass
class TextScores:
    """One model on the windows: its top-1 prediction and the text's negative log-likelihood at every
    position that has a next token (window - 1 per window)."""

    predictions: torch.Tensor  # (count, window - 1) token ids
    nll: torch.Tensor  # (count, window - 1) nats

    @property
    def positions(self) -> int:
        return int(self.predictions.numel())

    @property
    def perplexity(self) -> float:
        return math.exp(float(self.nll.double().mean()))


def text_scores(model: Model, windows: torch.Tensor, *, batch_size: int = 1) -> TextScores:
    """Run ``model`` (torch or an ONNX decoder export) over each window in one forward pass, no cache."""
    predictions, nll = [], []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size]
        logits = next_token_logits(model, ids, torch.ones_like(ids))[:, :-1]
        targets = ids[:, 1:]
        predictions.append(logits.argmax(-1))
        nll.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none"))
    return TextScores(predictions=torch.cat(predictions), nll=torch.cat(nll))


def agreement(reference: TextScores, candidate: TextScores) -> float:
    """Share of positions where the candidate's top-1 next token is the reference's."""
    if reference.predictions.shape != candidate.predictions.shape:
        raise ConfigError(f"agreement: scores over different windows ({tuple(reference.predictions.shape)} vs "
                          f"{tuple(candidate.predictions.shape)}).")
    return float((reference.predictions == candidate.predictions).double().mean())
