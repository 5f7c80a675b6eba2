"""Diffusion models (extra ``aigc-opt[diffusion]``): a diffusers UNet as an ``ao.Model``, its
sampler, and calibration across timesteps.

A denoiser is called tens of times per image with a timestep input, and its activations differ a
lot from step to step. :class:`Denoiser` wraps a diffusers ``UNet2DModel`` (or
``UNet2DConditionModel``) as a plain ``(sample, timestep, class_labels) -> noise`` module that
every pass takes (quantize, prune + distill, ONNX export with the timestep an input, compile);
:func:`sample` plugs the optimized Model back into any diffusers scheduler;
:func:`calibration_data` records int8 calibration inputs along real sampler trajectories, and
:func:`per_timestep` builds a denoiser whose int8 ranges are calibrated per band of timesteps.

Example:
    >>> import aigc_opt as ao
    >>> from aigc_opt import diffusion
    >>> from diffusers import DDIMScheduler                                        # doctest: +SKIP
    >>> unet = diffusion.from_diffusers("path/to/pipeline", component="unet")     # doctest: +SKIP
    >>> fast = ao.compile(ao.quantize(unet, "bf16"), "inductor")                   # doctest: +SKIP
    >>> images = diffusion.sample(fast, DDIMScheduler(), seeds=range(16), steps=20)  # doctest: +SKIP

``import aigc_opt`` does not import this module or diffusers; ``ao.Model.from_diffusers`` finds it
through ``model_sources.MODEL_SOURCES``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._architecture import AIGC_MODULES
from ._deps import require
from ._diffusion_sampling import DenoisingWalk, denoise, initial_noise
from .errors import ConfigError, InvalidInputError, UnsupportedModelError
from .target import Target

if TYPE_CHECKING:
    from .model import Model

__all__ = ["Denoiser", "VaeDecoder", "from_diffusers", "sample", "calibration_data", "check_calibration",
           "timesteps_of", "per_timestep", "TimestepBands", "DIFFUSERS_CLASSES"]

log = logging.getLogger("aigc_opt")

# The diffusers model classes a directory may name in its config.json (``_class_name``): only these
# are built, so an untrusted directory cannot make us instantiate anything else.
DIFFUSERS_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "AutoencoderKL", "AutoencoderTiny")
_UNETS = ("UNet2DModel", "UNet2DConditionModel")


def _diffusers() -> Any:
    return require("diffusers", extra="diffusion", purpose="Diffusion models")


class Denoiser(torch.nn.Module):
    """A diffusers UNet as ``forward(sample, timestep, class_labels=None) -> noise prediction``.

    The tensor output (not a ``UNet2DOutput``) and the timestep as a per-image tensor input make it
    exportable to ONNX with the timestep dynamic, so one graph serves every scheduler and step count.
    A conditional UNet (``UNet2DConditionModel``) takes ``encoder_hidden_states`` as third input.
    """

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self._conditional = type(unet).__name__ == "UNet2DConditionModel"
        self.train(unet.training)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | None = None,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if timestep is None:
            raise InvalidInputError(
                f"{type(self.unet).__name__} was called without a timestep: a denoiser predicts the noise of "
                "one sampler step and needs it. Call model(sample, timestep, class_labels) with timestep a "
                "tensor of shape (batch,), or sample with aigc_opt.diffusion.sample(model, scheduler, ...)."
            )
        if not isinstance(timestep, torch.Tensor):
            timestep = torch.tensor(timestep)
        if timestep.dim() == 0:
            timestep = timestep.reshape(1).expand(sample.shape[0])
        if self._conditional:
            return self.unet(sample, timestep, encoder_hidden_states=class_labels, return_dict=False)[0]
        return self.unet(sample, timestep, class_labels=class_labels, return_dict=False)[0]

    def check_calibration(self, data: Sequence[Any]) -> list[int]:
        """Capability for a calibrating pass: warn when ``data`` covers one timestep (:func:`check_calibration`)."""
        return check_calibration(data)

    def aigc_architecture(self) -> dict[str, Any]:
        return {"name": "diffusers-denoiser", "kwargs": {"class_name": type(self.unet).__name__,
                                                          "config": _plain_config(self.unet)}}


class VaeDecoder(torch.nn.Module):
    """A diffusers VAE's decoder as ``forward(latents) -> images`` (what a latent sampler runs last)."""

    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae
        self.train(vae.training)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]

    def aigc_architecture(self) -> dict[str, Any]:
        return {"name": "diffusers-vae-decoder", "kwargs": {"class_name": type(self.vae).__name__,
                                                             "config": _plain_config(self.vae)}}


def _plain_config(module: torch.nn.Module) -> dict[str, Any]:
    config = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    return json.loads(json.dumps(config, default=list))


def _build(class_name: str, config: dict[str, Any]) -> torch.nn.Module:
    if class_name not in DIFFUSERS_CLASSES:
        raise UnsupportedModelError(
            f"diffusers class {class_name!r:.60} is not one aigc_opt builds; it builds {list(DIFFUSERS_CLASSES)}."
        )
    return getattr(_diffusers(), class_name).from_config(config)


@AIGC_MODULES.register("diffusers-denoiser")
def _build_denoiser(class_name: str, config: dict[str, Any]) -> Denoiser:
    if class_name not in _UNETS:
        raise UnsupportedModelError(f"A Denoiser wraps one of {list(_UNETS)}, not {class_name!r:.60}.")
    return Denoiser(_build(class_name, config)).eval()


@AIGC_MODULES.register("diffusers-vae-decoder")
def _build_vae_decoder(class_name: str, config: dict[str, Any]) -> VaeDecoder:
    return VaeDecoder(_build(class_name, config)).eval()


# ---------------------------------------------------------------------------------------------- loading
def _component_dir(path: Path, component: str) -> Path:
    if not path.is_dir():
        raise UnsupportedModelError(f"{str(path)!r} is not a directory; from_diffusers takes a diffusers pipeline "
                                    "directory (with model_index.json) or one component's directory (config.json).")
    if (path / component / "config.json").is_file():
        return path / component
    if (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        return path  # the component's own directory
    present = sorted(p.name for p in path.iterdir() if (p / "config.json").is_file())
    raise UnsupportedModelError(
        f"The diffusers directory {str(path)!r} has no {component!r} component (no {component}/config.json); "
        f"components present: {present or 'none'}. Pass component= one of those, or the path of the "
        "component's own directory."
    )


def _read_config(directory: Path) -> dict[str, Any]:
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsupportedModelError(f"{str(directory / 'config.json')!r} is not a readable JSON config: {e}") from None
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{str(directory / 'config.json')!r} does not hold a JSON object.")
    return config


def _weights_format(directory: Path, trust: bool) -> bool:
    """True: load safetensors; False: the pickled ``.bin`` (only with ``trust=True``)."""
    names = {p.name for p in directory.iterdir()}
    if any(n.endswith(".safetensors") for n in names):
        return True
    if any(n.endswith(".bin") for n in names):
        if trust:
            return False
        raise UnsupportedModelError(
            f"{str(directory)!r} holds its weights only as a pickled .bin file, which can run code when loaded. "
            "Convert it to safetensors, or pass trust=True if you trust where it came from."
        )
    raise UnsupportedModelError(f"{str(directory)!r} has no weights file (diffusion_pytorch_model.safetensors).")


def from_diffusers(path: str | os.PathLike[str], *, component: str = "unet", target: str | Target = "host",
                   example_inputs: Any = None, batch_size: int = 1, trust: bool = False,
                   name: str | None = None) -> Model:
    """Load one component of a diffusers directory as an ``ao.Model`` (also ``ao.Model.from_diffusers``).

    Args:
        path: a pipeline directory (``model_index.json`` plus one folder per component) or a
            component's own directory (``config.json`` + ``diffusion_pytorch_model.safetensors``).
        component: ``"unet"`` (wrapped as :class:`Denoiser`) or ``"vae"`` (its decoder, :class:`VaeDecoder`).
        example_inputs: default: one batch of ``batch_size`` built from the config (noise of
            ``sample_size``, timestep 500, class 0 / zero text embeddings when the UNet is conditional).
        trust: allow pickled ``.bin`` weights. Without it only safetensors are read, only the
            classes in :data:`DIFFUSERS_CLASSES` are built, and no code from the directory runs.

    Example:
        >>> unet = from_diffusers("ddpm-cifar10", component="unet")   # doctest: +SKIP
        >>> unet(*unet.example_inputs).shape                          # doctest: +SKIP
        torch.Size([1, 3, 32, 32])
    """
    from .model import Model

    directory = _component_dir(Path(path), component)
    class_name = _read_config(directory).get("_class_name")
    if class_name not in DIFFUSERS_CLASSES:
        raise UnsupportedModelError(
            f"{str(directory / 'config.json')!r} names the class {class_name!r:.60}; aigc_opt loads "
            f"{list(DIFFUSERS_CLASSES)} (a custom class would need its code run)."
        )
    safetensors = _weights_format(directory, trust)
    cls = getattr(_diffusers(), class_name)
    module = cls.from_pretrained(str(directory), use_safetensors=safetensors, low_cpu_mem_usage=False).eval()
    if class_name in _UNETS:
        wrapped: torch.nn.Module = Denoiser(module)
        example_inputs = example_inputs if example_inputs is not None else unet_inputs(module, batch_size)
    else:
        wrapped = VaeDecoder(module)
        if example_inputs is None:
            c = module.config
            size = int(c.sample_size) // (2 ** (len(c.block_out_channels) - 1))
            example_inputs = (torch.randn(batch_size, int(c.latent_channels), size, size),)
    return Model(wrapped, example_inputs=example_inputs, target=target, name=name or f"{Path(path).name}-{component}")


def unet_inputs(unet: torch.nn.Module, batch_size: int = 1, *, timestep: int = 500, seed: int = 0) -> tuple[Any, ...]:
    """One batch a diffusers UNet takes: ``(sample, timestep, class_labels)`` (class_labels / text
    embeddings only when the UNet is conditional)."""
    c = unet.config
    size = c.sample_size if isinstance(c.sample_size, int) else c.sample_size[0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, int(c.in_channels), int(size), int(size), generator=g)
    t = torch.full((batch_size,), timestep, dtype=torch.long)
    if type(unet).__name__ == "UNet2DConditionModel":
        dim = c.cross_attention_dim if isinstance(c.cross_attention_dim, int) else c.cross_attention_dim[0]
        return x, t, torch.zeros(batch_size, 77, int(dim))
    if getattr(c, "num_class_embeds", None):
        return x, t, torch.arange(batch_size) % int(c.num_class_embeds)
    return x, t


# ---------------------------------------------------------------------------------------------- sampling
def sample(model: Any, scheduler: Any, *, seeds: Iterable[int] = range(16), steps: int = 20,
           class_labels: Sequence[int] | torch.Tensor | None = None, noise: torch.Tensor | None = None,
           shape: tuple[int, ...] | None = None, seed: int = 0) -> torch.Tensor:
    """Generate one image per seed with ``model`` (an ``ao.Model`` of a :class:`Denoiser`, any
    format) inside a diffusers ``scheduler``; returns the final images, (seeds, C, H, W).

    The loop it runs is the one of the docs (``scheduler.set_timesteps``, then per timestep
    ``scale_model_input`` / the model / ``scheduler.step``); the same seeds give every model the
    same initial noise, so images compare pixel for pixel.

    Args:
        shape: one image's (C, H, W); default from the model's example inputs.
        class_labels: one class per image for a class-conditional UNet.
        seed: seeds the noise a stochastic scheduler (DDPM) adds at each step.
    """
    seeds = [int(s) for s in seeds]
    if noise is None:
        if shape is None:
            if getattr(model, "example_inputs", None) is None:
                raise ConfigError("Pass shape=(C, H, W) or noise=: the model has no example inputs to take it from.")
            shape = tuple(model.example_inputs[0].shape[1:])
        noise = initial_noise(tuple(shape), seeds)
    labels = None if class_labels is None else torch.as_tensor(class_labels, dtype=torch.long)
    return denoise(model, scheduler, noise, steps=steps, class_labels=labels, seed=seed)


# ---------------------------------------------------------------------------------------------- calibration
def calibration_data(model: Any, scheduler: Any, *, steps: int = 20, seeds: Iterable[int] = range(8),
                     class_labels: Sequence[int] | torch.Tensor | None = None, every: int = 1,
                     timesteps: Sequence[int] | None = None) -> list[tuple[torch.Tensor, ...]]:
    """Calibration batches for int8-static, recorded along the fp32 model's own sampler trajectories.

    One batch (all seeds) per recorded step: every ``every``-th step, or only the steps whose
    timestep is in ``timesteps``. Activations at t=900 and t=50 differ by an order of magnitude, so
    calibrate on batches spread over the whole sampler (the default); see :func:`per_timestep` for
    ranges per band of timesteps.
    """
    seeds = [int(s) for s in seeds]
    shape = tuple(model.example_inputs[0].shape[1:])
    labels = None if class_labels is None else torch.as_tensor(class_labels, dtype=torch.long)
    walk = DenoisingWalk(scheduler, initial_noise(shape, seeds), steps=steps, class_labels=labels)
    wanted = None if timesteps is None else {int(t) for t in timesteps}
    batches = []
    for i, (x, t, y) in enumerate(walk):
        if (wanted is None and i % every == 0) or (wanted is not None and int(t[0]) in wanted):
            batches.append((x.clone(), t.clone()) if y is None else (x.clone(), t.clone(), y.clone()))
        with torch.inference_mode():
            walk.advance(model(x, t, y) if y is not None else model(x, t))
    if not batches:
        raise ConfigError(f"No step of the {steps}-step sampler has a timestep in {sorted(wanted or [])}; "
                          f"its timesteps are {[int(t) for t in walk.scheduler.timesteps]}.")
    return batches


def timesteps_of(data: Iterable[Any]) -> list[int]:
    """The distinct timesteps in calibration batches ``(sample, timestep, ...)`` or dicts with ``timestep``."""
    seen: set[int] = set()
    for batch in data:
        t = batch.get("timestep") if isinstance(batch, dict) else (batch[1] if len(batch) > 1 else None)
        if t is None:
            raise InvalidInputError("A calibration batch has no timestep: give (sample, timestep, class_labels) tuples.")
        seen.update(int(v) for v in torch.as_tensor(t).reshape(-1).tolist())
    return sorted(seen)


def check_calibration(data: Sequence[Any], *, what: str = "calibration data") -> list[int]:
    """Warn when ``data`` covers a single timestep: int8 ranges measured there will clip (or waste
    resolution on) the activations of every other step of the sampler. Returns its timesteps."""
    seen = timesteps_of(data)
    if len(seen) == 1:
        log.warning(
            "%s comes from a single timestep (t=%d): int8 ranges calibrated there will not cover the other "
            "steps of the sampler. Record batches across the trajectory: aigc_opt.diffusion.calibration_data("
            "model, scheduler, steps=...).", what, seen[0])
    return seen


class TimestepBands(torch.nn.Module):
    """Routes each call to the denoiser calibrated for its band of timesteps (per-timestep ranges).

    ``bounds[i]`` is the smallest timestep of band ``i``'s denoiser (bands sorted from high to low
    noise). All images of a batch must be at the same step, as in a sampler.
    """

    def __init__(self, denoisers: Sequence[Any], bounds: Sequence[int]):
        super().__init__()
        if len(denoisers) != len(bounds) or not denoisers:
            raise ConfigError(f"{len(denoisers)} denoisers for {len(bounds)} bounds; give one bound per denoiser.")
        self.denoisers = list(denoisers)  # already-optimized Models or modules; not registered as children
        self.bounds = [int(b) for b in bounds]
        self.eval()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | None = None, *rest: Any) -> torch.Tensor:
        if timestep is None:
            raise InvalidInputError("TimestepBands needs the timestep to pick a band: call model(sample, timestep, ...).")
        t = int(torch.as_tensor(timestep).reshape(-1)[0])
        for bound, denoiser in zip(self.bounds, self.denoisers):
            if t >= bound:
                return denoiser(sample, timestep, *rest)
        return self.denoisers[-1](sample, timestep, *rest)


def per_timestep(model: Model, data: Sequence[Any], *, bands: int = 2, method: str = "int8-static",
                 then: Any = None, **quantize_settings: Any) -> Model:
    """A Model whose int8 ranges are calibrated per band of timesteps: ``data`` (from
    :func:`calibration_data`) is split into ``bands`` groups of consecutive timesteps, one quantized
    (and, with ``then=ao.Compile(...)``, compiled) denoiser per group, routed by :class:`TimestepBands`.

    It runs in a sampler like any denoiser; it is not saved as one artifact (save each band's Model).
    """
    from .model import Model as _Model
    from .passes import quantize

    steps = timesteps_of(data)
    if isinstance(bands, bool) or not isinstance(bands, int) or not 1 <= bands <= len(steps):
        raise ConfigError(f"bands={bands!r}: must be an int from 1 to the {len(steps)} timesteps in data.")
    high_first = sorted(steps, reverse=True)
    size = -(-len(high_first) // bands)
    groups = [high_first[i:i + size] for i in range(0, len(high_first), size)]
    denoisers, bounds = [], []
    for group in groups:
        band = [b for b in data if int(torch.as_tensor(b[1]).reshape(-1)[0]) in set(group)]
        q = quantize(model, method, data=band, verbose=False, **quantize_settings)
        denoisers.append(then(q) if then is not None else q)
        bounds.append(min(group))
    routed = _Model(TimestepBands(denoisers, bounds), example_inputs=model.example_inputs, target=model.target,
                    name=f"{model.label}+per-timestep {method} x{len(groups)}", validate=False)
    return routed
