"""A generation workload for decoders: ``ao.tune`` times decode ms/token and checks next-token agreement.

``GenerationWorkload(prompts=[...], max_new_tokens=32)`` (or ``input_ids=`` and
``attention_mask=``) is the user's decode workload. With it, each trial:

- is timed with ``generate`` interleaved with the baseline round by round (``ao.compare``'s
  protocol): per round and model a 1-token generate (time to first token) and a full one; the
  latency objective is decode time per output token (``objective="ttft"``: time to first token),
  a ratio to the baseline's with a 95% paired-bootstrap interval;
- has as fidelity the teacher-forced next-token agreement with the baseline over held-out real
  text (``fidelity_positions``, default 1,020: four 256-token windows of the text shipped with
  aigc_opt, ``aigc_opt.bench.llm``'s measure, as ``benchmarks/llm_decode.py`` reports it): every
  model reads the same text in one forward pass per window, and at each position its top-1
  prediction is compared with the baseline's. The trial also records the positions and its
  perplexity on the text as a ratio to the baseline's. The prompts' own continuation is not used:
  with 16 generated tokens one differing near-tie is a drop of 0.0625, so every quantized recipe
  read as beyond a few-percent budget. The baseline scores 1.0; ``max_drop=0.02`` allows 2% of
  positions to disagree.

Example:
    >>> wl = ao.tune.GenerationWorkload(prompts=["def fib(n):", "The capital of"], max_new_tokens=32)  # doctest: +SKIP
    >>> result = ao.tune(lm, workload=wl, max_drop=0.02, budget="20m")                                 # doctest: +SKIP
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._checks import check_int
from ..errors import ConfigError, InvalidInputError
from ..runtime import runtime_for

if TYPE_CHECKING:
    from ..model import Model
    from .space import Candidates

__all__ = ["GenerationWorkload", "GenerationData", "OBJECTIVES"]

# Fidelity: at least this many teacher-forced positions (below it one differing token moves the
# agreement by more than 0.4%, coarser than the budgets people give).
MIN_POSITIONS = 256
DEFAULT_POSITIONS = 1020  # 4 windows of 256 tokens: benchmarks/llm_decode.py's measure
# Which timing is the latency objective: name -> (samples key, what it is).
OBJECTIVES: dict[str, str] = {"decode": "decode time per output token", "ttft": "time to first token"}
MIN_ROUNDS = 5  # interleaved rounds per trial at least (each: a 1-token and a full generate per model)
_STABLE = 0.02  # stop timing once the ratio's 95% interval is within ±2% (after MIN_ROUNDS)


@dataclass(frozen=True, kw_only=True, eq=False)
class GenerationWorkload:
    """The decode workload of a causal LM: prompts (or token ids) and how many tokens to generate.

    Args:
        prompts: the prompts (strings), encoded with ``tokenizer`` (default: the model's own,
            set by ``ao.Model.from_hf``), left-padded.
        input_ids: instead of prompts, token ids (batch, length), left-padded; ``attention_mask``
            (same shape, 0 on padding) defaults to all ones.
        max_new_tokens: tokens generated per prompt, exactly (>= 2: decode time needs two).
        batch: prompts per ``generate`` call (None: all in one batch).
        objective: ``"decode"`` (ms per output token after the first) or ``"ttft"``.
        pad_token_id: default: the tokenizer's pad (or end) token, else 0.
        fidelity_positions: teacher-forced positions of held-out text the fidelity is measured on
            (>= 256; rounded up to whole windows).
        fidelity_window: tokens per window (each gives ``window - 1`` positions); at most the
            model's context.
        fidelity_text: the text (default: ``aigc_opt.bench.llm.heldout_text()``, Python
            standard-library docstrings), tokenized with the model's tokenizer.
        fidelity_ids: instead of text, its token ids (any shape, read in order), e.g. for a model
            without a tokenizer.
    """

    prompts: Sequence[str] | None = None
    input_ids: Any = field(default=None, repr=False)
    attention_mask: Any = field(default=None, repr=False)
    max_new_tokens: int = 32
    batch: int | None = None
    objective: str = "decode"
    tokenizer: Any = field(default=None, repr=False)
    pad_token_id: int | None = None
    fidelity_positions: int = DEFAULT_POSITIONS
    fidelity_window: int = 256
    fidelity_text: str | None = field(default=None, repr=False)
    fidelity_ids: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.prompts is None) == (self.input_ids is None):
            raise ConfigError("GenerationWorkload takes prompts=[...] (strings) or input_ids= (a 2-D tensor of "
                              "token ids), exactly one of them.")
        if self.prompts is not None:
            if isinstance(self.prompts, str) or not isinstance(self.prompts, (list, tuple)) or not self.prompts \
                    or not all(isinstance(p, str) and p for p in self.prompts):
                raise ConfigError(f"GenerationWorkload: prompts must be a non-empty list of non-empty strings, got "
                                  f"{self.prompts!r:.80}; e.g. prompts=['def fib(n):'].")
            object.__setattr__(self, "prompts", tuple(self.prompts))
        else:
            self._check_ids()
        check_int("GenerationWorkload", "max_new_tokens", self.max_new_tokens, low=2, high=100_000)
        check_int("GenerationWorkload", "batch", self.batch, low=1, high=1_000_000, optional=True)
        check_int("GenerationWorkload", "pad_token_id", self.pad_token_id, low=0, high=2**31, optional=True)
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"GenerationWorkload: objective={self.objective!r} is not one of {sorted(OBJECTIVES)}.")
        self._check_fidelity()

    def _check_fidelity(self) -> None:
        check_int("GenerationWorkload", "fidelity_positions", self.fidelity_positions, low=MIN_POSITIONS,
                  high=10_000_000)
        check_int("GenerationWorkload", "fidelity_window", self.fidelity_window, low=2, high=1_000_000)
        if self.fidelity_text is not None and (not isinstance(self.fidelity_text, str) or not self.fidelity_text.strip()):
            raise ConfigError(f"GenerationWorkload: fidelity_text must be a non-empty string (held-out text), got "
                              f"{self.fidelity_text!r:.60}; leave it None for the text shipped with aigc_opt.")
        ids = self.fidelity_ids
        if ids is not None and self.fidelity_text is not None:
            raise ConfigError("GenerationWorkload takes fidelity_text= or fidelity_ids=, not both.")
        if ids is not None and (not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32)
                                or ids.numel() < self.fidelity_window):
            raise ConfigError(f"GenerationWorkload: fidelity_ids must be an int64 tensor of token ids with at least "
                              f"fidelity_window={self.fidelity_window} of them, got {_what(ids)}.")

    @property
    def windows_count(self) -> int:
        """Windows of held-out text the fidelity reads (``fidelity_positions`` rounded up)."""
        return -(-self.fidelity_positions // (self.fidelity_window - 1))

    @property
    def positions(self) -> int:
        """Teacher-forced positions the fidelity is measured on."""
        return self.windows_count * (self.fidelity_window - 1)

    def fidelity_windows(self, model: Model) -> torch.Tensor:
        """The held-out token windows, (count, window): from ``fidelity_ids``, else the text tokenized."""
        count, window = self.windows_count, self.fidelity_window
        context = getattr(getattr(model.artifact, "config", None), "max_position_embeddings", None)
        if isinstance(context, int) and window > context:
            raise ConfigError(f"GenerationWorkload: fidelity_window={window} is longer than {model.name}'s context "
                              f"({context} positions); give fidelity_window={context} or less.")
        if self.fidelity_ids is not None:
            ids = self.fidelity_ids.reshape(-1).long()
            if ids.numel() < count * window:
                raise ConfigError(f"GenerationWorkload: fidelity_ids has {ids.numel()} tokens; "
                                  f"{self.fidelity_positions} positions need {count} windows of {window} = "
                                  f"{count * window}. Give more ids or fewer fidelity_positions.")
            return ids[:count * window].reshape(count, window).contiguous()
        tok = self.tokenizer or getattr(model, "tokenizer", None)
        if tok is None:
            raise ConfigError(f"GenerationWorkload: {model.name} has no tokenizer to read the held-out text with; "
                              "pass tokenizer=, or fidelity_ids= (token ids of held-out text).")
        from ..bench.llm import heldout_text, text_windows

        return text_windows(tok, self.fidelity_text if self.fidelity_text is not None else heldout_text(),
                            window=window, count=count)

    def _check_ids(self) -> None:
        ids = self.input_ids
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0 \
                or ids.dtype not in (torch.int64, torch.int32):
            raise InvalidInputError(f"GenerationWorkload: input_ids must be a non-empty 2-D int64 tensor (batch, "
                                    f"length), got {_what(ids)}.")
        mask = self.attention_mask
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != ids.shape
                                 or not bool(((mask == 0) | (mask == 1)).all())):
            raise InvalidInputError(f"GenerationWorkload: attention_mask must be a 0/1 tensor shaped like input_ids "
                                    f"{tuple(ids.shape)}, got {_what(mask)}.")
        if mask is not None and bool((mask[:, -1] == 0).any()):
            raise InvalidInputError("GenerationWorkload: attention_mask has padding at the right end; decoder-only "
                                    "models continue from the right, so pad on the left.")

    @property
    def rows(self) -> int:
        return len(self.prompts) if self.prompts is not None else int(self.input_ids.shape[0])

    def batches(self, model: Model) -> list[dict[str, torch.Tensor]]:
        """The encoded, left-padded batches ``generate`` runs on."""
        if self.prompts is not None:
            tok = self.tokenizer or getattr(model, "tokenizer", None)
            if tok is None:
                raise ConfigError(f"GenerationWorkload has prompts but {model.name} has no tokenizer; pass "
                                  "tokenizer= or build the model with ao.Model.from_hf, or give input_ids=.")
            tok.padding_side = "left"
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            chunks = _chunks(list(self.prompts), self.batch)
            return [{k: v for k, v in tok(c, return_tensors="pt", padding=True).items()
                     if k in ("input_ids", "attention_mask")} for c in chunks]
        ids = self.input_ids.long()
        mask = torch.ones_like(ids) if self.attention_mask is None else self.attention_mask.long()
        step = self.batch or ids.shape[0]
        return [{"input_ids": ids[i:i + step], "attention_mask": mask[i:i + step]}
                for i in range(0, ids.shape[0], step)]

    def pad_id(self, model: Model) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        tok = self.tokenizer or getattr(model, "tokenizer", None)
        for value in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
            if isinstance(value, int):
                return value
        return 0

    def describe(self) -> str:
        source = f"{self.rows} prompts" if self.prompts is not None else f"input_ids {tuple(self.input_ids.shape)}"
        text = "given ids" if self.fidelity_ids is not None else "given text" if self.fidelity_text else "held-out text"
        return f"generation: {source}, {self.max_new_tokens} new tokens, batch {self.batch or self.rows}, " \
               f"objective {OBJECTIVES[self.objective]}; fidelity: next-token agreement over {self.positions} " \
               f"positions of {text} ({self.windows_count} x {self.fidelity_window} tokens)"


@dataclass
class GenerationData:
    """The workload resolved on the baseline: its batches, the held-out windows and the baseline's
    scores on them (computed once per tune, sent to every trial)."""

    spec: GenerationWorkload
    batches: list[dict[str, torch.Tensor]]
    pad_id: int
    windows: torch.Tensor | None = None  # (count, window) token ids of held-out text
    reference: Any = None  # the baseline's aigc_opt.bench.llm.TextScores on them

    @classmethod
    def prepare(cls, spec: GenerationWorkload, base: Model) -> GenerationData:
        from ..bench.llm import text_scores

        if not _capable(base.format) or not runtime_for(base.format).can_generate(base.artifact):
            raise ConfigError(f"A GenerationWorkload needs a causal LM that generates; {base.name} ({base.format}) "
                              "cannot. Load it with ao.Model.from_hf(path, task='causal-lm').")
        data = cls(spec=spec, batches=spec.batches(base), pad_id=spec.pad_id(base))
        data.windows = spec.fidelity_windows(base)
        data.reference = text_scores(base, data.windows)
        return data

    def score(self, model: Model) -> dict[str, Any]:
        """``metric``: share of the held-out positions where ``model``'s top-1 next token is the
        baseline's (1.0: all); ``positions``; ``perplexity`` on the text and its ratio to the baseline's."""
        from ..bench.llm import agreement, text_scores

        scores = text_scores(model, self.windows)
        ppl = scores.perplexity
        return {"metric": agreement(self.reference, scores), "positions": scores.positions, "perplexity": ppl,
                "perplexity_ratio": ppl / self.reference.perplexity}

    def agreement(self, model: Model) -> float:
        return float(self.score(model)["metric"])

    def fingerprint(self) -> str:
        """What a stored study must match besides the prompts: length, objective and the fidelity text."""
        import hashlib

        text = hashlib.sha256(self.windows.numpy().tobytes()).hexdigest()[:12]
        return f"|gen{self.spec.max_new_tokens}|{self.spec.objective}|fid{self.spec.positions}:{text}"

    def call_s(self, model: Model) -> float:
        """Seconds of one full generate over the workload."""
        start = time.perf_counter()
        for enc in self.batches:
            _generate(model, enc, self.spec.max_new_tokens, self.pad_id)
        return time.perf_counter() - start

    def min_trial_s(self, call_s: float) -> float:
        return (MIN_ROUNDS + 1) * 2 * call_s * (1 + 1 / self.spec.max_new_tokens)

    def time(self, base: Model, model: Model, max_time: float) -> dict[str, Any]:
        """Interleaved rounds (order shuffled per round) until ``max_time`` or a ±2% interval."""
        from ..bench.compare import iters_cap
        from ..bench.measurement import ratio_ci

        models = [base, model]
        samples: list[dict[str, list[float]]] = [{"ttft": [], "decode": []} for _ in models]
        for m in models:
            for enc in self.batches:
                _generate(m, enc, 2, self.pad_id)  # warm-up (and a first compile)
        cap = iters_cap() or 1_000_000
        order, shuffle, start = [0, 1], random.Random(0), time.perf_counter()
        while True:
            shuffle.shuffle(order)
            for j in order:
                ttft, decode = self._round(models[j])
                samples[j]["ttft"].append(ttft)
                samples[j]["decode"].append(decode)
            n = len(samples[0]["decode"])
            key = self.spec.objective
            ratio = ratio_ci(np.asarray(samples[0][key]), np.asarray(samples[1][key]))
            stable = ratio[2] - ratio[1] <= 2 * _STABLE * ratio[0]
            if n >= cap or (n >= MIN_ROUNDS and (stable or time.perf_counter() - start > max_time)):
                break
        if min(np.median(samples[0][key]), np.median(samples[1][key])) <= 0:
            raise InvalidInputError(f"{OBJECTIVES[key]} is not measurable on this workload: its median over {n} "
                                    "rounds is <= 0 (a full generate was not slower than a 1-token one); give more "
                                    "max_new_tokens (or longer prompts) so decoding dominates the noise.")
        ttft = ratio_ci(np.asarray(samples[0]["ttft"]), np.asarray(samples[1]["ttft"]))
        med = [{k: 1e3 * float(np.median(v)) for k, v in s.items()} for s in samples]
        return {"latency_ratio": [float(x) for x in ratio], "baseline_ms": med[0][key], "latency_ms": med[1][key],
                "ttft_ratio": [float(x) for x in ttft], "baseline_ttft_ms": med[0]["ttft"], "ttft_ms": med[1]["ttft"],
                "decode_ms_per_token": med[1]["decode"], "baseline_decode_ms_per_token": med[0]["decode"],
                "rounds": n, "cosine": None}

    def _round(self, model: Model) -> tuple[float, float]:
        """One round over the workload: time to first token, and decode seconds per output token."""
        ttft = decode = 0.0
        new = self.spec.max_new_tokens
        for enc in self.batches:
            start = time.perf_counter()
            _generate(model, enc, 1, self.pad_id)
            first = time.perf_counter() - start
            start = time.perf_counter()
            _generate(model, enc, new, self.pad_id)
            total = time.perf_counter() - start
            ttft += first
            decode += (total - first) / (new - 1)  # ao.bench.generation's TPOT, not clamped at 0
        return ttft, decode


def filter_generation(cands: Candidates, fmt: str) -> None:
    """Drop the variants whose output cannot generate and give next-token logits (e.g. an
    OpenVINO IR here), recording why in ``cands.refused``."""
    for r in list(cands.routes):
        route = cands.routes[r]
        out = fmt
        for p in route.passes:
            out = p.output_format(out)
        if not _capable(out):
            del cands.routes[r], cands.quantize[r], cands.compile[r]
            cands.refused.append((f"route {r}", f"{out} models cannot generate here (a GenerationWorkload needs "
                                                f"generate and next-token logits)"))
            continue
        for stage in (cands.quantize, cands.compile):
            keep = []
            for v in stage[r]:
                after = out
                for p in v.passes:
                    after = p.output_format(after)
                if _capable(after):
                    keep.append(v)
                else:
                    cands.refused.append((f"{r}: {v.label}", f"its output ({after}) cannot generate here"))
            stage[r] = keep


def _capable(fmt: str) -> bool:
    try:
        rt = runtime_for(fmt)
    except Exception:  # no runtime for the format
        return False
    return all(callable(getattr(rt, name, None)) for name in ("generate", "next_token_logits", "can_generate"))


def _generate(model: Model, enc: dict[str, torch.Tensor], new: int, pad_id: int) -> torch.Tensor:
    return model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=new, min_new_tokens=new,
                          pad_token_id=pad_id)


def _chunks(items: list[str], size: int | None) -> list[list[str]]:
    size = size or len(items)
    return [items[i:i + size] for i in range(0, len(items), size)]


def _what(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dim()}-D {x.dtype} tensor {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r:.60}"
