"""Image generation benchmark: diffusion denoisers inside their sampler, or one-call generators (GANs).

``ao.bench.image_generation(baseline, *candidates, scheduler=..., steps=..., seeds=...)`` generates
one image per seed with every model, timed round by round in a shuffled order (``ao.compare``'s
interleaving, so machine noise hits every model), and reports per model: images/s, ms per denoising
step, peak memory of one step, and on the final images, all started from the **same initial
noise**: PSNR and SSIM against the baseline's images, and with a ``classifier`` its accuracy on
class-conditional samples and a Fréchet distance of its features against ``real_images``.
``report.save_grid(path)`` writes the images of every model side by side.

With ``scheduler=None`` the models are one-call generators (a GAN): ``model(noise, class_labels)``
once per batch; "ms per step" is then ms per call.

Example:
    >>> from aigc_opt.bench import image_generation                                    # doctest: +SKIP
    >>> rep = image_generation(unet, fast, scheduler=DDIMScheduler(), steps=20, seeds=range(16),
    ...                        class_labels=list(range(10)) + list(range(6)))          # doctest: +SKIP
    >>> print(rep); rep.save_grid("grid.png")                                          # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .._diffusion_sampling import check_steps, denoise, initial_noise
from .._progress import progress_bar
from ..errors import ConfigError, InvalidInputError, UnsupportedModelError
from ._image_quality import accuracy, features_of, frechet_distance, psnr, save_grid, ssim
from .compare import MAX_ITERS_ENV, iters_cap
from .measurement import median_ci, ratio_ci
from .probes import peak_memory_bytes
from .report import text_table, unique_names

if TYPE_CHECKING:
    from ..model import Model

__all__ = ["image_generation", "ImageStats", "ImageGenerationReport"]

log = logging.getLogger("aigc_opt")


@dataclass
class ImageStats:
    """One model's numbers; ``seconds`` holds one whole-batch generation time per round."""

    name: str
    seconds: list[float]
    steps: int  # model calls per round (denoising steps x batches; batches for a one-call generator)
    batch_size: int  # images per round
    call_batch: int = 0  # images per model call
    peak_memory_bytes: int | None = None
    psnr_db: float | None = None  # vs the baseline's images (None for the baseline)
    ssim: float | None = None
    accuracy: float | None = None  # classifier on class-conditional samples
    frechet: float | None = None  # classifier features vs real images
    time_ratio: tuple[float, float, float] | None = None  # median vs baseline, 95% interval
    images: torch.Tensor | None = field(default=None, repr=False)

    @property
    def seconds_p50(self) -> float:
        return float(np.median(self.seconds))

    @property
    def images_per_second(self) -> float:
        return self.batch_size / self.seconds_p50

    @property
    def ms_per_step(self) -> float:
        """Milliseconds per model call (one denoising step of one batch)."""
        return self.seconds_p50 / self.steps * 1e3

    def to_dict(self) -> dict[str, Any]:
        lo, hi = median_ci(self.seconds)
        return {"name": self.name, "seconds": self.seconds, "seconds_p50": self.seconds_p50,
                "seconds_ci95": [lo, hi], "steps": self.steps, "batch_size": self.batch_size,
                "call_batch": self.call_batch,
                "images_per_second": self.images_per_second, "ms_per_step": self.ms_per_step,
                "peak_memory_bytes": self.peak_memory_bytes, "psnr_db": self.psnr_db, "ssim": self.ssim,
                "accuracy": self.accuracy, "frechet": self.frechet,
                "time_ratio": list(self.time_ratio) if self.time_ratio else None}


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


@dataclass
class ImageGenerationReport:
    """Result of :func:`image_generation`; ``print`` shows a table, one column per model."""

    baseline: ImageStats
    candidates: list[ImageStats]
    rounds: int
    value_range: tuple[float, float] = (-1.0, 1.0)

    @property
    def stats(self) -> list[ImageStats]:
        return [self.baseline, *self.candidates]

    def rows(self) -> list[tuple[str, list[str]]]:
        s = self.stats
        return [
            ("images/s", [f"{x.images_per_second:.2f}" for x in s]),
            ("ms per step (p50)", [f"{x.ms_per_step:.2f}" for x in s]),
            ("time vs baseline", ["1.00x"] + [f"{x.time_ratio[0]:.2f}x [{x.time_ratio[1]:.2f}, {x.time_ratio[2]:.2f}]"
                                              for x in s[1:]]),
            ("peak memory / step (MB)", [_f(None if x.peak_memory_bytes is None else x.peak_memory_bytes / 1e6, ".1f")
                                         for x in s]),
            ("PSNR vs baseline (dB)", [_f(x.psnr_db, ".2f") for x in s]),
            ("SSIM vs baseline", [_f(x.ssim, ".4f") for x in s]),
            ("classifier accuracy", [_f(x.accuracy, ".3f") for x in s]),
            ("Frechet distance", [_f(x.frechet, ".2f") for x in s]),
        ]

    def __str__(self) -> str:
        return text_table([x.name for x in self.stats], self.rows())

    def to_markdown(self) -> str:
        head = "| | " + " | ".join(x.name for x in self.stats) + " |"
        rule = "|---" * (len(self.stats) + 1) + "|"
        return "\n".join([head, rule, *("| " + label + " | " + " | ".join(cells) + " |" for label, cells in self.rows())])

    def to_dict(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "value_range": list(self.value_range),
                "baseline": self.baseline.to_dict(), "candidates": [c.to_dict() for c in self.candidates]}

    def save_grid(self, path: str | os.PathLike[str], max_images: int = 16) -> Path:
        """A PNG: one row per model, the same seed in the same column."""
        return save_grid(path, [(x.name, x.images) for x in self.stats if x.images is not None],
                         value_range=self.value_range, max_images=max_images)


def _generator_call(model: Model, noise: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    with torch.inference_mode():
        out = model(noise, labels) if labels is not None else model(noise)
    return out if isinstance(out, torch.Tensor) else out[0]


def _checked(models: Sequence[Any], scheduler: Any, steps: int, rounds: int, seeds: list[int],
             class_labels: Any) -> tuple[int, int, torch.Tensor | None]:
    for i, m in enumerate(models):
        if not hasattr(m, "run") or getattr(m, "example_inputs", None) is None:
            raise UnsupportedModelError(
                f"image_generation takes ao.Models with example inputs (noise first); model {i} is "
                f"{type(m).__name__}{' without example_inputs' if hasattr(m, 'run') else ''}."
            )
    if scheduler is not None:
        check_steps(scheduler, steps)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"rounds must be an int >= 1, got {rounds!r}.")
    cap = iters_cap()
    if cap is not None and rounds > cap:
        log.info("bench.image_generation: %d rounds instead of %d ($%s)", cap, rounds, MAX_ITERS_ENV)
        rounds = cap
    labels = None if class_labels is None else torch.as_tensor(list(class_labels), dtype=torch.long)
    if labels is not None and len(labels) != len(seeds):
        raise InvalidInputError(f"{len(labels)} class_labels for {len(seeds)} seeds: give one label per seed (image).")
    return (steps if scheduler is not None else 1), rounds, labels


def image_generation(baseline: Model, *candidates: Model, scheduler: Any = None, steps: int = 20,
                     seeds: Iterable[int] = range(16), class_labels: Sequence[int] | None = None,
                     batch_size: int | None = None, rounds: int = 3, warmup: int = 1, classifier: Callable[[torch.Tensor], Any] | None = None,
                     real_images: torch.Tensor | None = None, value_range: tuple[float, float] = (-1.0, 1.0),
                     sampler_seed: int = 0, order_seed: int = 0, verbose: bool | None = None) -> ImageGenerationReport:
    """Generate one image per seed with every model, interleaved, and score the images.

    Args:
        scheduler: a diffusers scheduler (the models are denoisers ``(sample, timestep, class_labels)``),
            or None for one-call generators ``(noise, class_labels)``.
        steps: denoising steps per image.
        seeds: one image per seed; the same seed gives every model the same initial noise.
        class_labels: the class of each image, for class-conditional models.
        batch_size: images per model call (default: all seeds in one batch); the seeds are
            generated batch after batch and a round times them all, so quality can be scored on
            many images while timing the batch size users run.
        rounds: timed rounds (each: one whole batch per model, models in a shuffled order).
        warmup: untimed batches (of ``batch_size``) per model first (compiles, caches).
        classifier: images -> logits; with ``class_labels`` gives accuracy, with ``real_images``
            (and the classifier's ``features`` method, else its logits) the Fréchet distance.
        sampler_seed: seeds the noise a stochastic sampler (DDPM) adds at each step, the same for every model.
    """
    seeds = [int(s) for s in seeds]
    models = [baseline, *candidates]
    calls, rounds, labels = _checked(models, scheduler, steps, rounds, seeds, class_labels)
    noise = initial_noise(tuple(baseline.example_inputs[0].shape[1:]), seeds)
    size = _batch_size(batch_size, len(seeds))
    chunks = [slice(i, i + size) for i in range(0, len(seeds), size)]

    def generate(m: Model, chunks: list[slice] = chunks) -> torch.Tensor:
        out = []
        for c in chunks:
            y = None if labels is None else labels[c]
            out.append(_generator_call(m, noise[c], y) if scheduler is None else
                       denoise(m, scheduler, noise[c], steps=steps, class_labels=y, seed=sampler_seed))
        return torch.cat(out)

    names = unique_names([getattr(m, "label", getattr(m, "name", f"model{i}")) for i, m in enumerate(models)])
    stats = [ImageStats(name=n, seconds=[], steps=calls * len(chunks), batch_size=len(seeds), call_batch=size)
             for n in names]
    bar = progress_bar(len(models) * (warmup + rounds), desc="image_generation", unit="batch", verbose=verbose)
    for i, m in enumerate(models):
        for _ in range(warmup):
            stats[i].images = generate(m, chunks[:1])
            if bar is not None:
                bar.update(1)
    order, shuffle = list(range(len(models))), random.Random(order_seed)
    for _ in range(rounds):
        shuffle.shuffle(order)  # no model always runs right after the same neighbour
        for j in order:
            start = time.perf_counter()
            stats[j].images = generate(models[j])
            stats[j].seconds.append(time.perf_counter() - start)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    _score(models, stats, noise[chunks[0]], None if labels is None else labels[chunks[0]], scheduler, classifier,
           real_images, value_range, labels)
    return ImageGenerationReport(baseline=stats[0], candidates=stats[1:], rounds=rounds, value_range=value_range)


def _batch_size(batch_size: Any, n: int) -> int:
    if batch_size is None:
        return n
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1 (images per model call) or None, got {batch_size!r}.")
    return min(batch_size, n)


def _score(models: list[Model], stats: list[ImageStats], noise: torch.Tensor, labels: torch.Tensor | None,
           scheduler: Any, classifier: Any, real_images: torch.Tensor | None, value_range: tuple[float, float],
           all_labels: torch.Tensor | None) -> None:
    """Fidelity on all images; peak memory of one model call on one batch (``noise``, ``labels``)."""
    lo, hi = value_range
    reference = stats[0].images.float().clamp(lo, hi)
    real = None if classifier is None or real_images is None else features_of(classifier, real_images)
    step_batch: tuple[Any, ...] = (noise,) if scheduler is None else (noise, torch.full((len(noise),), 500))
    if labels is not None:
        step_batch = (*step_batch, labels)
    for m, s in zip(models, stats):
        images = s.images.float().clamp(lo, hi)
        if s is not stats[0]:
            s.psnr_db = psnr(reference, images, value_range)
            s.ssim = ssim(reference, images, value_range)
            s.time_ratio = ratio_ci(stats[0].seconds, s.seconds)
        if classifier is not None and all_labels is not None:
            s.accuracy = accuracy(classifier, images, all_labels)
        if real is not None:
            s.frechet = frechet_distance(features_of(classifier, images), real)
        with torch.inference_mode():
            s.peak_memory_bytes = peak_memory_bytes(m, step_batch, str(getattr(m, "device", "cpu")))
