"""Small importable models for tests (importable by name so factories can rebuild them)."""

from __future__ import annotations

import torch


class MLP(torch.nn.Module):
    def __init__(self, d_in: int = 32, hidden: int = 64, d_out: int = 10, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.act = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


def make_mlp(d_in: int = 32, hidden: int = 64, d_out: int = 10) -> MLP:
    return MLP(d_in, hidden, d_out).eval()


class DictOut(torch.nn.Module):
    """Keyword inputs in, a dict of outputs out (like a Hugging Face model)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.proj = torch.nn.Linear(16, 16)
        self.cls = torch.nn.Linear(16, 4)

    def forward(self, features: torch.Tensor, scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = torch.relu(self.proj(features))
        if scale is not None:
            h = h * scale
        return {"hidden": h, "logits": self.cls(h)}


class ConvOnly(torch.nn.Module):
    """No nn.Linear at all: nothing for int8-dynamic to quantize."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Payload:
    """An arbitrary picklable object: safe loading must refuse it."""

    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
            torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 16, 3, padding=1, groups=2), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
        )
        self.head = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


class DataDependent(torch.nn.Module):
    """Python control flow on a tensor value: exporters cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)
