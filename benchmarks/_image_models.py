"""The models benchmarks/image_generation.py trains on scikit-learn digits (16x16, values in [-1, 1]):
a class-conditional diffusers UNet2DModel (DDPM objective), a conditional DCGAN generator, and the
digits classifier whose accuracy and features score the generated images. Trained weights are cached
in benchmarks/.cache (gitignored) keyed by the training settings.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

CACHE = Path(__file__).resolve().parent / ".cache"


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Train on one intra-op thread: on a shared 2-core machine under load, two OpenMP threads
    measured 5x slower per training step than one (they spin waiting for each other)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)
log = logging.getLogger("benchmarks.image_generation")


def digits_16() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits, upsampled to 16x16 (bilinear), in [-1, 1]; and their labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1) * 2 - 1
    return x, torch.tensor(d.target)


def split(x: torch.Tensor, y: torch.Tensor, test: float = 0.25) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    n_test = int(len(x) * test)
    te, tr = perm[:n_test], perm[n_test:]
    return x[tr], y[tr], x[te], y[te]


# ---------------------------------------------------------------------------------------------- classifier
class DigitsClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(64 * 16, 64), torch.nn.ReLU())
        self.head = torch.nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int = 8) -> DigitsClassifier:
    with one_thread():
        return _train_classifier_impl(x, y, epochs)


def _train_classifier_impl(x: torch.Tensor, y: torch.Tensor, epochs: int = 8) -> DigitsClassifier:
    path = CACHE / f"classifier-{epochs}ep.pt"
    torch.manual_seed(0)
    net = DigitsClassifier()
    if path.exists():
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            # small shifts so generated digits, a pixel off-centre, are still read
            xb = torch.roll(x[idx], shifts=(int(torch.randint(-1, 2, ())), int(torch.randint(-1, 2, ()))), dims=(2, 3))
            loss = F.cross_entropy(net(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    CACHE.mkdir(exist_ok=True)
    torch.save(net.state_dict(), path)
    return net.eval()


# ---------------------------------------------------------------------------------------------- UNet
UNET_CONFIG = dict(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
                   block_out_channels=(16, 32, 32), norm_num_groups=8, num_class_embeds=10,
                   down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                   up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def train_unet(x: torch.Tensor, y: torch.Tensor, seconds: float, batch: int = 64) -> tuple[torch.nn.Module, dict]:
    with one_thread():
        return _train_unet_impl(x, y, seconds, batch)


def _train_unet_impl(x: torch.Tensor, y: torch.Tensor, seconds: float, batch: int = 64) -> tuple[torch.nn.Module, dict]:
    """DDPM epsilon-prediction training for ``seconds`` of wall time (cached)."""
    from diffusers import DDPMScheduler, UNet2DModel

    path = CACHE / f"unet-{int(seconds)}s.pt"
    torch.manual_seed(0)
    unet = UNet2DModel(**UNET_CONFIG)
    if path.exists():
        saved = torch.load(path, weights_only=True)
        unet.load_state_dict(saved["state"])
        return unet.eval(), saved["info"]
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(unet.parameters(), lr=2e-3, weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    start, steps, losses = time.perf_counter(), 0, []
    unet.train()
    while time.perf_counter() - start < seconds:
        idx = torch.randint(0, len(x), (batch,))
        x0, labels = x[idx], y[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,))
        pred = unet(sched.add_noise(x0, noise, t), t, class_labels=labels).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
        losses.append(float(loss.detach()))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].mul_(0.995).add_(v.detach(), alpha=0.005) if v.dtype.is_floating_point else ema[k].copy_(v)
        if steps % 200 == 0:
            log.info("unet step %d loss %.4f (%.0f s)", steps, sum(losses[-200:]) / 200, time.perf_counter() - start)
    unet.load_state_dict(ema)
    info = {"train_seconds": seconds, "train_steps": steps, "batch": batch,
            "final_loss": sum(losses[-200:]) / max(1, len(losses[-200:]))}
    CACHE.mkdir(exist_ok=True)
    torch.save({"state": unet.state_dict(), "info": info}, path)
    return unet.eval(), info


# ---------------------------------------------------------------------------------------------- GAN
Z_DIM = 32


class Generator(torch.nn.Module):
    """Conditional DCGAN generator: (z, class) -> 1x16x16 image in [-1, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 16)
        self.fc = torch.nn.Sequential(torch.nn.Linear(Z_DIM + 16, 128 * 4 * 4), torch.nn.BatchNorm1d(128 * 16),
                                      torch.nn.ReLU())
        self.net = torch.nn.Sequential(
            torch.nn.ConvTranspose2d(128, 64, 4, 2, 1), torch.nn.BatchNorm2d(64), torch.nn.ReLU(),
            torch.nn.ConvTranspose2d(64, 32, 4, 2, 1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 1, 3, padding=1), torch.nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.fc(torch.cat([z, self.embed(labels)], 1)).view(-1, 128, 4, 4)
        return self.net(h)


class Discriminator(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(11, 64, 4, 2, 1), torch.nn.LeakyReLU(0.2),
            torch.nn.Conv2d(64, 128, 4, 2, 1), torch.nn.BatchNorm2d(128), torch.nn.LeakyReLU(0.2),
            torch.nn.Flatten(), torch.nn.Linear(128 * 16, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        planes = F.one_hot(labels, 10).float()[:, :, None, None].expand(-1, -1, 16, 16)
        return self.net(torch.cat([x, planes], 1))


def train_gan(x: torch.Tensor, y: torch.Tensor, seconds: float, batch: int = 64) -> tuple[Generator, dict]:
    with one_thread():
        return _train_gan_impl(x, y, seconds, batch)


def _train_gan_impl(x: torch.Tensor, y: torch.Tensor, seconds: float, batch: int = 64) -> tuple[Generator, dict]:
    path = CACHE / f"gan-{int(seconds)}s.pt"
    torch.manual_seed(0)
    g = Generator()
    if path.exists():
        saved = torch.load(path, weights_only=True)
        g.load_state_dict(saved["state"])
        return g.eval(), saved["info"]
    d = Discriminator()
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = torch.nn.BCEWithLogitsLoss()
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        idx = torch.randint(0, len(x), (batch,))
        real, labels = x[idx], y[idx]
        fake = g(torch.randn(batch, Z_DIM), labels)
        loss_d = bce(d(real, labels), torch.full((batch, 1), 0.9)) + bce(d(fake.detach(), labels), torch.zeros(batch, 1))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        loss_g = bce(d(fake, labels), torch.ones(batch, 1))
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        steps += 1
    info = {"train_seconds": seconds, "train_steps": steps, "batch": batch}
    CACHE.mkdir(exist_ok=True)
    torch.save({"state": g.state_dict(), "info": info}, path)
    return g.eval(), info


def noised_pairs(x: torch.Tensor, y: torch.Tensor, batches: int, batch: int = 16, seed: int = 1) -> list[tuple]:
    """Distillation data for a denoiser: (x_t, t, label) batches, real digits noised at random
    timesteps as in training (the teacher's outputs on them are the targets)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        idx = torch.randint(0, len(x), (batch,), generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,), generator=g)
        noise = torch.randn(x[idx].shape, generator=g)
        out.append((sched.add_noise(x[idx], noise, t), t, y[idx]))
    return out
