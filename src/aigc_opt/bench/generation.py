"""Generation benchmark for causal language models (Hugging Face ``generate``).

``ao.bench.generation(baseline, *candidates, prompts=..., max_new_tokens=...)`` times greedy
generation interleaved round by round, like ``ao.compare``, and reports per model:
time to first token (a 1-token generate: prefill + one step), time per output token (the
rest of an N-token generate, divided by N-1), tokens/s, and against the baseline the share of
identical greedy tokens and the first position where they diverge.

Free-running agreement is fragile: one near-tie flipped early changes every token after it, so
two equally good candidates can score 0.75 and 1.0. The report therefore also gives the
teacher-forced next-token agreement: every model reads the baseline's own continuation in one
forward pass, and at each generated position its top-1 prediction is compared with the
baseline's. That measures how often the candidate would pick the baseline's token, position by
position, without compounding.

Example:
    >>> from aigc_opt.bench import generation                         # doctest: +SKIP
    >>> rep = generation(m, ao.quantize(m, "int8-dynamic"), prompts=["Hello"], max_new_tokens=16)  # doctest: +SKIP
    >>> print(rep)                                                      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import ConfigError, UnsupportedModelError
from ..runtime import runtime_for
from .compare import MAX_ITERS_ENV, iters_cap
from .measurement import median_ci, ratio_ci
from .report import speedup_panel, text_table, unique_names

if TYPE_CHECKING:
    from ..model import Model

__all__ = ["generation", "GenerationStats", "GenerationReport", "next_token_logits", "continuation_batch"]

log = logging.getLogger("aigc_opt")


@dataclass
class GenerationStats:
    name: str
    ttft: list[float]  # seconds, one per round
    total: list[float]  # seconds for max_new_tokens tokens, one per round
    new_tokens: int
    batch_size: int
    tokens: list[list[int]] = field(default_factory=list, repr=False)  # greedy ids per prompt
    token_agreement: float | None = None
    first_divergence: int | None = None  # earliest position (over prompts) where tokens differ
    next_token_agreement: float | None = None  # teacher-forced top-1 agreement on the baseline's continuation
    next_token_predictions: list[list[int]] = field(default_factory=list, repr=False)  # its top-1 picks there
    ttft_ratio: tuple[float, float, float] | None = None
    tpot_ratio: tuple[float, float, float] | None = None

    @property
    def tpot(self) -> list[float]:
        return [(t - f) / max(self.new_tokens - 1, 1) for t, f in zip(self.total, self.ttft)]

    @property
    def ttft_p50(self) -> float:
        return float(np.median(self.ttft))

    @property
    def tpot_p50(self) -> float:
        return float(np.median(self.tpot))

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens * self.batch_size / float(np.median(self.total))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(ttft_p50=self.ttft_p50, tpot_p50=self.tpot_p50, tokens_per_second=self.tokens_per_second,
                   ttft_ci95=list(median_ci(np.asarray(self.ttft))), tpot_ci95=list(median_ci(np.asarray(self.tpot))))
        return out


@dataclass
class GenerationReport:
    baseline: GenerationStats
    candidates: list[GenerationStats]
    rounds: int

    def names(self) -> list[str]:
        """Column names, baseline first, repeats told apart (for reports put together by hand)."""
        return unique_names([e.name for e in (self.baseline, *self.candidates)])

    def rows(self) -> list[tuple[str, list[str]]]:
        es = [self.baseline, *self.candidates]
        ratio = lambda r: f"{r[0]:.2f}x [{r[1]:.2f}, {r[2]:.2f}]" if r else "1.00x"  # noqa: E731
        return [
            ("time to first token p50 (ms)", [f"{e.ttft_p50 * 1e3:.2f}" for e in es]),
            ("TTFT vs baseline", [ratio(e.ttft_ratio) for e in es]),
            ("time per output token p50 (ms)", [f"{e.tpot_p50 * 1e3:.2f}" for e in es]),
            ("TPOT vs baseline", [ratio(e.tpot_ratio) for e in es]),
            ("tokens/s", [f"{e.tokens_per_second:.1f}" for e in es]),
            ("greedy token agreement", ["1"] + [f"{e.token_agreement:.3f}" for e in self.candidates]),
            ("first divergence (token)", ["-"] + [str(e.first_divergence) if e.first_divergence is not None
                                                  else "none" for e in self.candidates]),
            ("next-token agreement (teacher-forced)", ["1"] + [f"{e.next_token_agreement:.3f}"
                                                               for e in self.candidates]),
        ]

    def __str__(self) -> str:
        b = self.baseline
        table = text_table(self.names(), self.rows())
        return "\n".join([table, "", f"batch {b.batch_size}, {b.new_tokens} new tokens (greedy), "
                                      f"{self.rounds} interleaved rounds"])

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline.to_dict(), "candidates": [c.to_dict() for c in self.candidates],
                "rounds": self.rounds}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationReport:
        """A GenerationReport back from :meth:`to_dict` (e.g. to draw a stored result again)."""
        from .report import _from_fields

        def stats(d: dict[str, Any]) -> GenerationStats:
            s = _from_fields(GenerationStats, d)
            s.ttft_ratio = tuple(s.ttft_ratio) if s.ttft_ratio else None
            s.tpot_ratio = tuple(s.tpot_ratio) if s.tpot_ratio else None
            return s

        return cls(baseline=stats(data["baseline"]), candidates=[stats(c) for c in data["candidates"]],
                   rounds=data["rounds"])

    def to_markdown(self) -> str:
        names = self.names()
        lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        return "\n".join(lines + [f"| {label} | " + " | ".join(cells) + " |" for label, cells in self.rows()])

    def figure(self) -> Any:
        """The report as a matplotlib Figure (needs matplotlib): time per output token per model
        (one point per round), and TPOT speed-up vs teacher-forced next-token agreement with one
        point per candidate, labels placed apart. Built without pyplot (see ``Report.figure``)."""
        from ._figures import new_figure, wrap_label

        entries = [self.baseline, *self.candidates]
        names = self.names()
        fig, (left, right) = new_figure((13, 0.45 * len(entries) + 2.5), purpose="GenerationReport.figure()")
        for row, e in enumerate(entries):
            left.scatter([t * 1e3 for t in e.tpot], [row] * len(e.tpot), s=14, alpha=0.6, color=f"C{row}")
            left.plot([e.tpot_p50 * 1e3] * 2, [row - 0.3, row + 0.3], color="black", linewidth=1.5)  # median
        left.set_yticks(range(len(entries)), [wrap_label(n) for n in names], fontsize=8)
        left.invert_yaxis()
        left.set_xlabel("time per output token (ms; rounds, median as a bar)")
        left.set_title(f"batch {self.baseline.batch_size}, {self.baseline.new_tokens} greedy tokens")
        rows = [(names[row], f"C{row}", e.tpot_ratio, e.next_token_agreement)  # the same colour as on the left
                for row, e in enumerate(entries[1:], start=1) if e.tpot_ratio and e.next_token_agreement is not None]
        speedup_panel(fig, right, rows, xlabel="TPOT speed-up vs baseline (x, 95% interval)",
                      ylabel="next-token agreement (teacher-forced)")
        return fig

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Save :meth:`figure` (PNG, SVG or PDF by the suffix), atomically. Needs matplotlib."""
        from ._figures import save_figure

        return save_figure(self.figure(), path)


def _generate(model: Model, enc: dict[str, torch.Tensor], new_tokens: int, pad_id: int) -> torch.Tensor:
    return model.generate(enc["input_ids"], enc.get("attention_mask"), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=pad_id)


def next_token_logits(model: Model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Logits (batch, sequence, vocab) of one forward pass over left-padded sequences, no cache.

    Positions follow transformers' rule for padded batches (count of real tokens before each);
    a compiled torch model runs its plain module (same numbers, no recompilation for the shape).
    """
    logits = getattr(runtime_for(model.format), "next_token_logits", None)
    if logits is None:
        raise UnsupportedModelError(f"{model.label} ({model.format}) cannot give next-token logits: it takes a "
                                    "Hugging Face causal LM or its ONNX decoder export.")
    return logits(model.artifact, input_ids, attention_mask)


def continuation_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       new_tokens: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The (left-padded) prompts followed by their generated tokens, and the mask over both: what
    every model reads for the teacher-forced agreement."""
    new = torch.as_tensor(new_tokens, dtype=input_ids.dtype)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    return torch.cat([input_ids, new], dim=1), torch.cat([mask, torch.ones_like(new)], dim=1)


def _teacher_forced_predictions(model: Model, sequences: torch.Tensor, mask: torch.Tensor,
                                prompt_len: int) -> torch.Tensor:
    """Top-1 prediction at each generated position, reading the given continuation."""
    logits = next_token_logits(model, sequences, mask)
    return logits[:, prompt_len - 1:-1].argmax(-1)


def _can_generate(model: Model) -> bool:
    return getattr(runtime_for(model.format), "can_generate", lambda artifact: False)(model.artifact)


def generation(baseline: Model, *candidates: Model, prompts: Sequence[str], max_new_tokens: int = 32,
               rounds: int = 5, warmup: int = 1, tokenizer: Any = None, seed: int = 0) -> GenerationReport:
    """Time greedy generation of every model interleaved, and compare tokens with the baseline.

    Args:
        prompts: the prompts, generated as one left-padded batch.
        max_new_tokens: tokens generated per prompt (exactly: ``min_new_tokens`` is set too).
        rounds: interleaved timing rounds (each: a 1-token and a full generate per model).
        tokenizer: default: ``baseline.tokenizer`` (set by ``Model.from_hf``).
        seed: seeds the per-round shuffle of the model order.
    """
    rounds = _checked_settings(prompts, max_new_tokens, rounds)
    models = [baseline, *candidates]
    for m in models:
        if not _can_generate(m):
            raise UnsupportedModelError(
                f"{m.name} ({m.format}) cannot generate; the generation benchmark takes Hugging Face causal "
                "LMs (e.g. ao.Model.from_hf(path, task='causal-lm')) and their ONNX exports (ao.export(lm, 'onnx'))."
            )
    tokenizer = tokenizer or baseline.tokenizer
    if tokenizer is None:
        raise ConfigError("No tokenizer: pass tokenizer= or build the baseline with ao.Model.from_hf.")
    tokenizer.padding_side = "left"  # decoder-only models continue from the right end
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = dict(tokenizer(list(prompts), return_tensors="pt", padding=True))
    names = unique_names([m.label for m in models])  # two models never share a column name
    stats = [GenerationStats(name=name, ttft=[], total=[], new_tokens=max_new_tokens, batch_size=len(prompts))
             for name in names]
    _timed_rounds(models, stats, enc, tokenizer.pad_token_id, max_new_tokens=max_new_tokens, rounds=rounds,
                  warmup=warmup, seed=seed)
    _agreement(models, stats, enc)
    return GenerationReport(baseline=stats[0], candidates=stats[1:], rounds=rounds)


def _checked_settings(prompts: Sequence[str], max_new_tokens: int, rounds: int) -> int:
    """Refuse bad settings; returns the rounds to run (capped by ``$AIGC_OPT_MAX_ITERS``)."""
    if isinstance(prompts, str) or not prompts:
        raise ConfigError(f"prompts must be a non-empty list of strings, got {prompts!r}.")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 2:
        raise ConfigError(f"max_new_tokens must be an int >= 2 (TPOT needs two tokens), got {max_new_tokens!r}.")
    if not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be an int >= 1, got {rounds!r}.")
    cap = iters_cap()
    if cap is not None and rounds > cap:
        log.info("bench.generation: %d rounds instead of %d ($%s)", cap, rounds, MAX_ITERS_ENV)
        return cap
    return rounds


def _timed_rounds(models: list[Model], stats: list[GenerationStats], enc: dict[str, torch.Tensor], pad_id: int, *,
                  max_new_tokens: int, rounds: int, warmup: int, seed: int) -> None:
    """Warm up, then per round (models in a shuffled order) time a 1-token and a full generate."""
    prompt_len = enc["input_ids"].shape[1]
    for m in models:
        for _ in range(warmup):
            _generate(m, enc, 2, pad_id)
    order = list(range(len(models)))
    shuffle = random.Random(seed)
    for _ in range(rounds):
        shuffle.shuffle(order)  # like ao.compare: no model always runs after the same neighbour
        for j in order:
            start = time.perf_counter()
            _generate(models[j], enc, 1, pad_id)
            stats[j].ttft.append(time.perf_counter() - start)
            start = time.perf_counter()
            out = _generate(models[j], enc, max_new_tokens, pad_id)
            stats[j].total.append(time.perf_counter() - start)
            stats[j].tokens = out[:, prompt_len:].tolist()


def _agreement(models: list[Model], stats: list[GenerationStats], enc: dict[str, torch.Tensor]) -> None:
    """Teacher-forced and free-running agreement with the baseline, and the timing ratios."""
    prompt_len = enc["input_ids"].shape[1]
    base = np.asarray(stats[0].tokens)
    sequences, full_mask = continuation_batch(enc["input_ids"], enc.get("attention_mask"), stats[0].tokens)
    predictions = [_teacher_forced_predictions(m, sequences, full_mask, prompt_len) for m in models]
    for s, pred in zip(stats, predictions):
        s.next_token_predictions = pred.tolist()
        s.next_token_agreement = float((pred == predictions[0]).float().mean()) if s is not stats[0] else None
    for s in stats[1:]:
        same = np.asarray(s.tokens) == base
        s.token_agreement = float(same.mean())
        diverged = [int(np.argmin(row)) for row in same if not row.all()]
        s.first_divergence = min(diverged) if diverged else None
        s.ttft_ratio = ratio_ci(stats[0].ttft, s.ttft)
        s.tpot_ratio = ratio_ci(stats[0].tpot, s.tpot)
