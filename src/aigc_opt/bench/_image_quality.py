"""Image fidelity and quality numbers for ``bench.image_generation``: PSNR, SSIM, classifier
accuracy, Fréchet distance on classifier features, and the side-by-side grid PNG.

Images are float tensors (N, C, H, W) in a known value range (default [-1, 1], diffusers' range).

Example:
    >>> import torch
    >>> a = torch.rand(4, 1, 16, 16) * 2 - 1
    >>> round(psnr(a, a), 1)
    100.0
    >>> round(ssim(a, a), 4)
    1.0
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._store import atomic_write
from ..errors import ConfigError, InvalidInputError

__all__ = ["psnr", "ssim", "accuracy", "frechet_distance", "features_of", "save_grid", "PSNR_CAP_DB"]

# Identical images have an infinite PSNR; it is capped so means and JSON stay finite.
PSNR_CAP_DB = 100.0


def _span(value_range: tuple[float, float]) -> float:
    lo, hi = value_range
    if not hi > lo:
        raise ConfigError(f"value_range must be (low, high) with high > low, got {value_range!r}.")
    return float(hi - lo)


def psnr(reference: torch.Tensor, images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """Mean over images of each image's PSNR (dB) against ``reference`` (capped at :data:`PSNR_CAP_DB`)."""
    if reference.shape != images.shape:
        raise InvalidInputError(f"PSNR of images {tuple(images.shape)} against {tuple(reference.shape)}: shapes differ.")
    mse = ((reference.double() - images.double()) ** 2).flatten(1).mean(1)
    db = 10 * torch.log10(_span(value_range) ** 2 / mse.clamp(min=1e-30))
    return float(db.clamp(max=PSNR_CAP_DB).mean())


def ssim(reference: torch.Tensor, images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0),
         window: int = 7) -> float:
    """Mean structural similarity (Wang et al. 2004) with a uniform ``window`` x ``window`` filter
    over valid positions, per channel, as scikit-image's ``structural_similarity`` defaults."""
    if reference.shape != images.shape:
        raise InvalidInputError(f"SSIM of images {tuple(images.shape)} against {tuple(reference.shape)}: shapes differ.")
    window = min(window, reference.shape[-1], reference.shape[-2])
    x, y = reference.double(), images.double()
    c = x.shape[1]
    kernel = torch.full((c, 1, window, window), 1.0 / window**2, dtype=torch.float64)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(t, kernel, groups=c)

    n = window * window
    cov_norm = n / (n - 1) if n > 1 else 1.0  # sample covariance, as scikit-image
    mx, my = blur(x), blur(y)
    vx, vy = cov_norm * (blur(x * x) - mx * mx), cov_norm * (blur(y * y) - my * my)
    vxy = cov_norm * (blur(x * y) - mx * my)
    span = _span(value_range)
    c1, c2 = (0.01 * span) ** 2, (0.03 * span) ** 2
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def accuracy(classifier: Callable[[torch.Tensor], Any], images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images the classifier assigns to the class they were generated for."""
    with torch.inference_mode():
        logits = classifier(images)
    return float((torch.as_tensor(logits).argmax(-1) == labels).double().mean())


def features_of(classifier: Any, images: torch.Tensor) -> np.ndarray:
    """The classifier's feature vectors: its ``features(images)`` method when it has one, else its outputs."""
    fn = getattr(classifier, "features", None) or classifier
    with torch.inference_mode():
        return torch.as_tensor(fn(images)).double().flatten(1).numpy()


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula, any features)."""
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise InvalidInputError(f"A Fréchet distance needs at least 2 feature vectors per side, got {a.shape[0]} "
                                f"and {b.shape[0]}: generate more images (seeds=...).")
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root1 = _sqrt_psd(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def save_grid(path: str | os.PathLike[str], rows: Sequence[tuple[str, torch.Tensor]], *,
              value_range: tuple[float, float] = (-1.0, 1.0), scale: int = 4, max_images: int = 16) -> Path:
    """A PNG with one row per model (its name on the left) and its images side by side, so the
    same seed sits in the same column for every model."""
    try:
        from PIL import Image, ImageDraw
    except ImportError as e:  # pillow comes with matplotlib (extra [plot]) and diffusers
        from ..errors import MissingDependencyError

        raise MissingDependencyError("pillow", "plot", "Saving an image grid") from e
    lo, span = value_range[0], _span(value_range)
    label_w, pad = 8 * max(len(name) for name, _ in rows) + 8, 2
    first = rows[0][1]
    n = min(first.shape[0], max_images)
    h, w = first.shape[-2] * scale, first.shape[-1] * scale
    canvas = Image.new("RGB", (label_w + n * (w + pad), len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (name, images) in enumerate(rows):
        y0 = r * (h + pad)
        draw.text((4, y0 + h // 2 - 5), name, fill="black")
        pixels = ((images[:n].float().clamp(lo, lo + span) - lo) / span * 255).round().to(torch.uint8)
        for i in range(n):
            img = pixels[i]
            img = img.expand(3, -1, -1) if img.shape[0] == 1 else img[:3]
            tile = Image.fromarray(img.permute(1, 2, 0).numpy(), "RGB").resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_w + i * (w + pad), y0))
    return atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
