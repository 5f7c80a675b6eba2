"""Image generation (issue #21): a diffusers UNet as an ao.Model inside its sampler, Model.from_diffusers,
calibration across timesteps, and ao.bench.image_generation's per-image numbers. Tiny UNets, few steps."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

import aigc_opt as ao
from aigc_opt.errors import ConfigError, InvalidInputError, UnsupportedModelError
from aigc_opt.model_sources import MODEL_SOURCES

diffusers = pytest.importorskip("diffusers")
from aigc_opt import diffusion  # noqa: E402
from aigc_opt.bench import _image_quality as quality  # noqa: E402


def tiny_unet(seed: int = 0, classes: int | None = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        norm_num_groups=4, num_class_embeds=classes, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D")).eval()


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return tiny_unet()


@pytest.fixture(scope="module")
def model(unet) -> ao.Model:
    return ao.Model(diffusion.Denoiser(unet), example_inputs=diffusion.unet_inputs(unet, 4), name="tiny-unet")


def ddim() -> object:
    return diffusers.DDIMScheduler(num_train_timesteps=1000)


LABELS = [0, 1, 2, 3]


# ---------------------------------------------------------------------------------------------- denoiser + sampler
def test_denoiser_matches_the_unet_and_needs_a_timestep(unet, model):
    x, t, y = model.example_inputs
    assert torch.allclose(model(x, t, y), unet(x, t, class_labels=y).sample, atol=1e-6)
    assert torch.allclose(model(x, torch.tensor(500), y), model(x, t, y), atol=1e-6)  # a scalar timestep broadcasts
    with pytest.raises(InvalidInputError, match="without a timestep"):
        model(x)


def test_sample_is_deterministic_per_seed_and_uses_the_labels(model):
    a = diffusion.sample(model, ddim(), seeds=[0, 1, 2, 3], steps=3, class_labels=LABELS)
    b = diffusion.sample(model, ddim(), seeds=[0, 1, 2, 3], steps=3, class_labels=LABELS)
    c = diffusion.sample(model, ddim(), seeds=[0, 1, 2, 3], steps=3, class_labels=[3, 2, 1, 0])
    assert a.shape == (4, 1, 8, 8)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    one = diffusion.sample(model, ddim(), seeds=[2], steps=3, class_labels=[2])
    assert torch.allclose(one[0], a[2], atol=1e-5)  # image i comes from seed i alone


def test_sampler_bad_input_is_typed(model):
    with pytest.raises(ConfigError, match="steps=0"):
        diffusion.sample(model, ddim(), seeds=[0], steps=0, class_labels=[0])
    with pytest.raises(InvalidInputError, match="one label per image"):
        diffusion.sample(model, ddim(), seeds=[0, 1], steps=2, class_labels=[0, 1, 2])


# ---------------------------------------------------------------------------------------------- calibration
def test_calibration_spread_over_the_trajectory_and_single_timestep_warned(model, caplog):
    spread = diffusion.calibration_data(model, ddim(), steps=4, seeds=range(4), class_labels=LABELS)
    assert len(spread) == 4 and len(diffusion.timesteps_of(spread)) == 4
    assert all(b[0].shape == (4, 1, 8, 8) for b in spread)
    with caplog.at_level(logging.WARNING, logger="aigc_opt"):
        assert len(diffusion.check_calibration(spread)) == 4
    assert "single timestep" not in caplog.text
    single = diffusion.calibration_data(model, ddim(), steps=4, seeds=range(4), class_labels=LABELS,
                                        timesteps=[int(spread[0][1][0])])
    with caplog.at_level(logging.WARNING, logger="aigc_opt"):
        diffusion.check_calibration(single)
    assert "single timestep" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aigc_opt"):  # the capability a calibrating pass can call
        assert model.artifact.check_calibration(single) == diffusion.timesteps_of(single)
    assert "single timestep" in caplog.text
    with pytest.raises(ConfigError, match="no step|No step"):
        diffusion.calibration_data(model, ddim(), steps=4, seeds=[0], class_labels=[0], timesteps=[7])


def test_timestep_bands_route_by_timestep():
    class Constant(torch.nn.Module):
        def __init__(self, value: float):
            super().__init__()
            self.value = value

        def forward(self, x, t, y=None):
            return torch.full_like(x, self.value)

    bands = diffusion.TimestepBands([Constant(1.0), Constant(2.0)], bounds=[500, 0])
    x = torch.zeros(2, 1, 4, 4)
    assert float(bands(x, torch.tensor([900, 900]))[0, 0, 0, 0]) == 1.0
    assert float(bands(x, torch.tensor([499, 499]))[0, 0, 0, 0]) == 2.0
    with pytest.raises(InvalidInputError):
        bands(x)


def test_int8_static_on_a_unet(model, caplog):
    """Regression: torchao's x86 quantizer annotated the UNet's int64 timestep mul (histc on Long)."""
    calib = diffusion.calibration_data(model, ddim(), steps=2, seeds=range(4), class_labels=LABELS)
    q = ao.quantize(model, "int8-static", data=calib, verbose=False)
    out, ref = q(*model.example_inputs), model(*model.example_inputs)
    assert out.shape == ref.shape == (4, 1, 8, 8)
    assert torch.nn.functional.cosine_similarity(out.flatten(1), ref.flatten(1)).min() > 0.95
    # Quantize asks the model whether its calibration data is poor: one timestep is warned about
    single = [b for b in calib if int(b[1][0]) == int(calib[0][1][0])]
    with caplog.at_level(logging.WARNING, logger="aigc_opt"):
        ao.quantize(model, "int8-static", data=single, verbose=False)
    assert "single timestep" in caplog.text


# ---------------------------------------------------------------------------------------------- from_diffusers
@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory, unet):
    root = tmp_path_factory.mktemp("pipe")
    unet.save_pretrained(root / "unet")  # safetensors by default
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DDIMPipeline", "unet": ["diffusers", "UNet2DModel"]}))
    return root


def test_from_diffusers_loads_the_component(pipeline_dir, unet):
    m = MODEL_SOURCES.get("diffusers")(pipeline_dir, component="unet", batch_size=2)
    x, t, y = m.example_inputs
    assert x.shape == (2, 1, 8, 8) and t.dtype == torch.long and y.tolist() == [0, 1]
    assert torch.allclose(m(x, t, y), unet(x, t, class_labels=y).sample, atol=1e-6)
    again = diffusion.from_diffusers(pipeline_dir / "unet")  # the component's own directory
    assert torch.allclose(again(x, t, y), m(x, t, y))
    via_model = ao.Model.from_diffusers(pipeline_dir, component="unet", batch_size=2)
    assert torch.allclose(via_model(x, t, y), m(x, t, y))


def test_from_diffusers_bad_directories(pipeline_dir, tmp_path, unet):
    with pytest.raises(UnsupportedModelError, match=r"no 'vae' component.*\['unet'\]"):
        diffusion.from_diffusers(pipeline_dir, component="vae")
    pickled = tmp_path / "pickled"
    unet.save_pretrained(pickled, safe_serialization=False)
    with pytest.raises(UnsupportedModelError, match="trust=True"):
        diffusion.from_diffusers(pickled)
    assert diffusion.from_diffusers(pickled, trust=True).example_inputs[0].shape == (1, 1, 8, 8)
    custom = tmp_path / "custom"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"_class_name": "MyEvilUNet"}))
    with pytest.raises(UnsupportedModelError, match="MyEvilUNet"):
        diffusion.from_diffusers(custom)


def test_save_and_load_rebuilds_the_denoiser_without_trust(model, tmp_path):
    model.save(tmp_path / "m")
    back = ao.Model.load(tmp_path / "m")
    assert torch.allclose(back(*model.example_inputs), model(*model.example_inputs), atol=1e-6)


def test_import_aigc_opt_does_not_import_diffusers():
    code = "import sys, aigc_opt; print('diffusers' in sys.modules, 'aigc_opt.diffusion' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# ---------------------------------------------------------------------------------------------- ONNX in the sampler
@pytest.mark.slow
def test_onnx_export_keeps_the_timestep_an_input(model):
    pytest.importorskip("onnxruntime")
    onnx_model = ao.export(model, "onnx")
    a = diffusion.sample(model, ddim(), seeds=range(4), steps=3, class_labels=LABELS)
    b = diffusion.sample(onnx_model, ddim(), seeds=range(4), steps=3, class_labels=LABELS)
    assert (a - b).abs().max() < 1e-3
    # another scheduler and step count than anything seen at export: the same graph serves it
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=1000)
    c = diffusion.sample(model, ddpm, seeds=range(2), steps=5, class_labels=[0, 1])
    d = diffusion.sample(onnx_model, ddpm, seeds=range(2), steps=5, class_labels=[0, 1])
    assert (c - d).abs().max() < 1e-3


# ---------------------------------------------------------------------------------------------- metrics
def test_psnr_ssim_and_frechet_values():
    torch.manual_seed(0)
    a = torch.rand(3, 1, 16, 16) * 2 - 1
    assert quality.psnr(a, a) == quality.PSNR_CAP_DB
    # uniform error 0.1 on a range of 2: 10*log10(4 / 0.01) = 26.02 dB
    assert quality.psnr(a, a + 0.1) == pytest.approx(26.0206, abs=1e-3)
    assert quality.ssim(a, a) == pytest.approx(1.0)
    assert quality.ssim(a, torch.rand(3, 1, 16, 16) * 2 - 1) < 0.3
    rng = np.random.default_rng(0)
    f = rng.normal(size=(4000, 3))
    assert quality.frechet_distance(f, f) == pytest.approx(0.0, abs=1e-6)
    assert quality.frechet_distance(f, f + 2.0) == pytest.approx(12.0, rel=1e-6)  # |shift|^2 = 3 * 4
    with pytest.raises(InvalidInputError):
        quality.frechet_distance(f[:1], f)


# ---------------------------------------------------------------------------------------------- bench
class _Classifier(torch.nn.Module):
    """Deterministic stand-in: 'class' = which quarter of the image is brightest."""

    def features(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    def forward(self, x):
        return self.features(x)


def test_image_generation_report(model, unet, tmp_path):
    nudged = tiny_unet()  # the same weights, slightly moved: a candidate whose images differ a little
    with torch.no_grad():
        for p in nudged.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    low_model = ao.Model(diffusion.Denoiser(nudged), example_inputs=model.example_inputs, name="nudged")
    real = torch.rand(8, 1, 8, 8) * 2 - 1
    rep = ao.bench.image_generation(model, low_model, model, scheduler=ddim(), steps=2, seeds=range(4),
                                    class_labels=LABELS, batch_size=2, rounds=2, classifier=_Classifier(),
                                    real_images=real, verbose=False)
    base, low, same = rep.stats
    assert len(base.seconds) == len(low.seconds) == 2
    assert (base.steps, base.batch_size, base.call_batch) == (4, 4, 2)  # 2 steps x 2 batches of 2 images
    assert base.ms_per_step == pytest.approx(np.median(base.seconds) / 4 * 1e3)
    assert base.images_per_second == pytest.approx(4 / np.median(base.seconds))
    # batch by batch gives the same images as one batch: same noise per seed
    whole = diffusion.sample(model, ddim(), seeds=range(4), steps=2, class_labels=LABELS)
    assert torch.allclose(base.images, whole, atol=1e-5)
    assert same.psnr_db == quality.PSNR_CAP_DB and same.ssim == pytest.approx(1.0)  # same model, same noise
    assert 15 < low.psnr_db < quality.PSNR_CAP_DB  # moved weights move pixels, a little
    assert 0.0 <= low.accuracy <= 1.0 and low.frechet >= 0.0
    assert len({base.name, low.name, same.name}) == 3
    assert "PSNR vs baseline" in str(rep) and "| PSNR vs baseline (dB) |" in rep.to_markdown()
    assert json.loads(json.dumps(rep.to_dict()))["candidates"][0]["psnr_db"] == pytest.approx(low.psnr_db)
    png = rep.save_grid(tmp_path / "grid.png")
    from PIL import Image

    assert Image.open(png).size[1] == 3 * (8 * 4 + 2)  # one row per model


def test_image_generation_one_call_generator_and_bad_input(model):
    gen = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Unflatten(1, (1, 8, 8))).eval()
    g = ao.Model(gen, example_inputs=(torch.randn(4, 16),))
    rep = ao.bench.image_generation(g, ao.quantize(g, "bf16"), scheduler=None, seeds=range(4), rounds=1,
                                    verbose=False)
    assert rep.baseline.steps == 1 and rep.baseline.images.shape == (4, 1, 8, 8)
    assert rep.candidates[0].psnr_db > 25
    with pytest.raises(UnsupportedModelError, match="ao.Models"):
        ao.bench.image_generation(gen, scheduler=None)
    with pytest.raises(InvalidInputError, match="one label per seed"):
        ao.bench.image_generation(model, scheduler=ddim(), steps=2, seeds=range(4), class_labels=[0])
    with pytest.raises(ConfigError, match="steps=0"):
        ao.bench.image_generation(model, scheduler=ddim(), steps=0, seeds=range(4), class_labels=LABELS)


def test_prune_handles_diffusers_blocks(model, tmp_path):
    """Torch-Pruning removes channels from the convolutions; the prune structure rules set diffusers'
    own size attributes again (Downsample2D asserts its input has ``channels``), and a load replays them."""
    pytest.importorskip("torch_pruning")
    pruned = ao.prune(model, 0.5, round_to=4)
    unet = pruned.artifact.unet
    checked = set()
    for name, m in unet.named_modules():
        kind = type(m).__name__
        if kind in ("Downsample2D", "Upsample2D"):
            assert m.channels == m.conv.in_channels and m.out_channels == m.conv.out_channels, name
        elif kind == "ResnetBlock2D":
            assert (m.in_channels, m.out_channels) == (m.conv1.in_channels, m.conv2.out_channels), name
        elif kind == "Attention":
            assert (m.query_dim, m.inner_dim, m.out_dim) == (m.to_q.in_features, m.to_q.out_features,
                                                           m.to_out[0].out_features), name
        else:
            continue
        checked.add(kind)
    assert checked == {"Downsample2D", "Upsample2D", "ResnetBlock2D", "Attention"}
    assert unet.down_blocks[0].downsamplers[0].channels == 4  # 8 -> 4: pruned, and the attribute follows
    layers = pruned.history[-1].details["layers"]
    assert layers["unet.down_blocks.0.downsamplers.0"]["channels"] == [8, 4]
    sample, t, y = model.example_inputs
    out = pruned(sample, t, y)
    assert out.shape == sample.shape and torch.isfinite(out).all()
    images = diffusion.sample(pruned, ddim(), seeds=range(4), steps=2, class_labels=LABELS)
    assert images.shape == (4, 1, 8, 8)
    pruned.save(tmp_path / "pruned")
    back = ao.Model.load(tmp_path / "pruned")
    assert back.artifact.unet.down_blocks[0].downsamplers[0].channels == 4
    assert torch.allclose(back(sample, t, y), out, atol=1e-6)
