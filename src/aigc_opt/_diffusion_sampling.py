"""The sampling loop of a diffusion model, shared by ``aigc_opt.diffusion.sample`` and
``aigc_opt.bench.image_generation`` (a leaf: it knows no pass and no Model internals).

The denoiser is any callable ``denoiser(sample, timestep, class_labels) -> noise prediction``;
an ``ao.Model`` of a :class:`aigc_opt.diffusion.Denoiser` is one, whatever its format (torch,
compiled, ONNX, OpenVINO). The scheduler is a diffusers scheduler (``DDPMScheduler``,
``DDIMScheduler``, ...), used through its public ``set_timesteps`` / ``scale_model_input`` /
``step`` methods, so any of them plugs in.

Example:
    >>> from diffusers import DDIMScheduler                                   # doctest: +SKIP
    >>> images = denoise(model, DDIMScheduler(), torch.randn(4, 1, 16, 16), steps=20)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .errors import ConfigError, InvalidInputError

__all__ = ["denoise", "DenoisingWalk", "initial_noise", "check_steps"]


def check_steps(scheduler: Any, steps: Any) -> int:
    """Refuse a step count the scheduler cannot run (a typed error naming the range)."""
    total = int(getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000) or 1000)
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= total:
        raise ConfigError(
            f"steps={steps!r} is not a denoising step count this scheduler runs: it must be an int from 1 to "
            f"num_train_timesteps={total} ({type(scheduler).__name__}). Typical: 20-50 for DDIM, all {total} "
            "for DDPM's ancestral sampler or fewer with set_timesteps."
        )
    return steps


def initial_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """One noise image per seed (row ``i`` comes from ``seeds[i]``), so every model starts from the same noise."""
    if not seeds:
        raise ConfigError("seeds must name at least one seed (one image per seed).")
    rows = [torch.randn((1, *shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.cat(rows)


class DenoisingWalk:
    """The sampler's steps, one ``(model_input, timestep, class_labels)`` at a time.

    Iterate it, run the denoiser on each step's inputs and call :meth:`advance` with its noise
    prediction; :attr:`latents` then holds the images so far. Used to sample and to record
    calibration inputs from real trajectories. The scheduler is copied: the caller's keeps its state.
    """

    def __init__(self, scheduler: Any, noise: torch.Tensor, *, steps: int,
                 class_labels: torch.Tensor | None = None, seed: int = 0):
        check_steps(scheduler, steps)
        self.scheduler = copy.deepcopy(scheduler)
        self.scheduler.set_timesteps(steps)
        self.latents = noise * getattr(self.scheduler, "init_noise_sigma", 1.0)
        self.class_labels = class_labels
        # stochastic samplers (DDPM) draw the same step noise for every model
        self._generator = torch.Generator().manual_seed(seed)
        self._t: Any = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        for t in self.scheduler.timesteps:
            self._t = t
            timestep = torch.full((self.latents.shape[0],), int(t), dtype=torch.long)
            yield self.scheduler.scale_model_input(self.latents, t), timestep, self.class_labels

    def advance(self, prediction: Any) -> None:
        prediction = prediction if isinstance(prediction, torch.Tensor) else prediction[0]
        self.latents = self.scheduler.step(prediction.float(), self._t, self.latents,
                                           generator=self._generator).prev_sample


def denoise(denoiser: Callable[..., Any], scheduler: Any, noise: torch.Tensor, *, steps: int,
            class_labels: torch.Tensor | None = None, seed: int = 0,
            on_step: Callable[[int], None] | None = None) -> torch.Tensor:
    """Run the whole sampler from ``noise`` and return the final images (the scheduler's range,
    [-1, 1] for models trained on images scaled so)."""
    if not isinstance(noise, torch.Tensor) or noise.dim() != 4:
        raise InvalidInputError(
            f"noise must be a 4-d tensor (batch, channels, height, width), got "
            f"{tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__}."
        )
    if class_labels is not None and class_labels.shape[:1] != noise.shape[:1]:
        raise InvalidInputError(
            f"class_labels has {class_labels.shape[0]} labels for {noise.shape[0]} noise images; give one label per image."
        )
    walk = DenoisingWalk(scheduler, noise, steps=steps, class_labels=class_labels, seed=seed)
    for i, (model_input, timestep, labels) in enumerate(walk):
        with torch.inference_mode():
            walk.advance(denoiser(model_input, timestep, labels) if labels is not None
                         else denoiser(model_input, timestep))
        if on_step is not None:
            on_step(i)
    return walk.latents
