"""Distill: train a student (typically a pruned or quantized model) to match its teacher.

Losses, summed:

- output KD (``output_loss``): ``"kl"`` KL divergence of temperature-softened distributions
  (scaled by T^2, Hinton et al.), or ``"mse"`` / ``"cosine"`` for models whose output is not a
  score (embeddings), or ``"none"``;
- feature KD (``feature_layers=[("student.layer", "teacher.layer"), ...]``, ``feature_loss`` MSE or
  cosine): when a student layer is narrower (after pruning) a linear projection to the teacher's
  width is learned with the student and dropped afterwards;
- the task loss when batches carry labels (cross-entropy, or ``loss_fn(outputs, labels)``):
  ``alpha * KD + (1 - alpha) * task``.

Training: AdamW, linear warm-up then cosine decay, gradient clipping, a tqdm bar with the loss,
``eval_fn(model) -> float`` (higher is better) each epoch with the best weights kept, a checkpoint
per epoch (``checkpoint_dir=``, atomic, rank 0 only) and ``resume_from=``. Deterministic for a
``seed``. Under ``torchrun --nproc_per_node=N`` the same call trains with DistributedDataParallel
(``strategy="ddp"``) or FSDP (``strategy="fsdp"``); see docs/distill.md.

Example:
    >>> import aigc_opt as ao, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    >>> teacher = ao.Model(net.eval(), example_inputs=(torch.randn(2, 16),))
    >>> student = ao.prune(teacher, 0.5, round_to=1)                      # doctest: +SKIP
    >>> data = [torch.randn(32, 16) for _ in range(8)]
    >>> better = distill(student, teacher, data, epochs=2, lr=1e-3)       # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import KW_ONLY, dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from torch import nn

from .._checks import bounded, check_fields
from ..errors import ConfigError, UnsupportedModelError
from ._distill_losses import FeatureLoss, OutputLoss
from .base import Pass, named, register_pass, runtime_field

if TYPE_CHECKING:
    from ..model import Model
    from ..target import Target

__all__ = ["Distill", "distill", "STRATEGIES"]

Strategy = Literal["ddp", "fsdp"]
TrainPrecision = Literal["auto", "fp32", "bf16", "fp16"]
STRATEGIES: tuple[str, ...] = typing.get_args(Strategy)
PRECISIONS: tuple[str, ...] = typing.get_args(TrainPrecision)


@register_pass
@dataclass(frozen=True)
class Distill(Pass):
    """Recover a student's accuracy from a teacher by knowledge distillation.

    Args:
        epochs: passes over ``data``.
        lr: peak learning rate of AdamW (reached after ``warmup_ratio`` of the steps).
        temperature: softening of both distributions for ``output_loss="kl"``.
        alpha: weight of the distillation loss against the task loss (used when labels are given).
        output_loss: ``"kl"``, ``"mse"``, ``"cosine"`` or ``"none"``.
        feature_layers: ``(student module, teacher module)`` name pairs for feature KD.
        feature_loss: ``"mse"`` or ``"cosine"``; feature_weight: its weight.
        labeled: batches are ``(inputs, labels)`` pairs (a dict batch's ``labels`` key is always used).
        weight_decay, warmup_ratio, max_grad_norm (0 for none), seed: training settings.
        strategy: ``"ddp"`` or ``"fsdp"`` when run under torchrun with more than one process.
        precision: ``"auto"``, ``"fp32"``, ``"bf16"`` or ``"fp16"``: the autocast dtype of the
            forward passes (weights, gradients and optimizer state stay fp32; fp16 on CUDA uses a
            gradient scaler). ``"auto"``: bf16 (else fp16) on CUDA targets that have it, fp32 on CPU,
            where autocast helps training little and costs accuracy; ask ``"bf16"`` explicitly on
            a CPU with AMX/AVX512-BF16. The record says which precision ran and why.
        teacher: an ao.Model (format ``"torch"``) or nn.Module; in a Pipeline, defaults to the model
            before the last Prune. data: iterable of batches, iterated once per epoch.
        eval_fn: ``eval_fn(model) -> float``, higher is better; the best epoch's weights are kept.
        loss_fn: ``loss_fn(student_outputs, labels) -> scalar`` replacing cross-entropy.
        checkpoint_dir / resume_from: write ``last.pt`` after each epoch / continue from one.
        verbose: progress bar (None: only on a TTY).
    (teacher, data, eval_fn, loss_fn, checkpoint_dir, resume_from, verbose are run-time only.)

    The student trains in train mode: dropout is on and BatchNorm layers normalize with batch
    statistics (and update their running ones). A batch that gives a BatchNorm a single value per
    channel (batch 1 where the layer's spatial size is 1) has no batch statistics: it raises
    :class:`~aigc_opt.errors.InvalidInputError` naming the layer, its input shape, the epoch and
    the batch, before that step changes anything; use batches of 2 or more samples.
    """

    accepts_compiled: ClassVar[bool] = False

    epochs: int = bounded(1, 1, 100_000)
    _: KW_ONLY
    lr: float = bounded(1e-4, 0, 1e6, low_open=True)
    temperature: float = bounded(2.0, 0, 1e6, low_open=True)
    alpha: float = bounded(0.5, 0, 1)
    output_loss: OutputLoss = "kl"
    feature_layers: tuple[tuple[str, str], ...] = ()
    feature_loss: FeatureLoss = "mse"
    feature_weight: float = bounded(1.0, 0, 1e6)
    labeled: bool = False
    weight_decay: float = bounded(0.01, 0, 1e6)
    warmup_ratio: float = bounded(0.1, 0, 1)
    max_grad_norm: float = bounded(1.0, 0, 1e6)
    seed: int = bounded(0, 0, 2**63 - 1)
    strategy: Strategy = "ddp"
    precision: TrainPrecision = "auto"
    # Run-time only (never in a recipe or a record): typed for readers and checkers; the teacher is an
    # nn.Module or an ao.Model, so it stays Any here and is checked where it is used.
    teacher: Any = runtime_field(default=None, compare=False, repr=False)
    data: Iterable[Any] | None = runtime_field(default=None, compare=False, repr=False)
    eval_fn: Callable[[nn.Module], float] | None = runtime_field(default=None, compare=False, repr=False)
    loss_fn: Callable[..., Any] | None = runtime_field(default=None, compare=False, repr=False)
    checkpoint_dir: str | os.PathLike[str] | None = runtime_field(default=None, compare=False, repr=False)
    resume_from: str | os.PathLike[str] | None = runtime_field(default=None, compare=False, repr=False)
    verbose: bool | None = runtime_field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> ConfigError:
            return ConfigError(f"Distill: {name}={getattr(self, name)!r} is not allowed; {rule}.")

        check_fields(self, "Distill")  # the field types are the rules (closed sets, ranges, bools)
        pairs = tuple(tuple(p) for p in self.feature_layers) if isinstance(self.feature_layers, Sequence) else None
        if pairs is None or isinstance(self.feature_layers, str) or not all(
                len(p) == 2 and all(isinstance(n, str) for n in p) for p in pairs):
            raise bad("feature_layers", "give (student module name, teacher module name) pairs, "
                      "e.g. [('encoder.layer.5', 'encoder.layer.5')]")
        object.__setattr__(self, "feature_layers", pairs)
        if self.output_loss == "none" and not pairs and self.loss_fn is None:
            raise ConfigError("Distill: output_loss='none' without feature_layers leaves nothing to distill; "
                              "give feature_layers=[(student_layer, teacher_layer)] or an output_loss.")

    # ------------------------------------------------------------------ checks
    def check_static(self, fmt: str, target: Target) -> None:
        if fmt != "torch":
            raise UnsupportedModelError(
                f"{self.describe()} trains the student, which needs a PyTorch module (format 'torch'), but the "
                f"model is in format {fmt!r}. Distill before Export, e.g. Pipeline([Prune(0.3), "
                "Distill(data=...), Export('onnx')]).")

    def check_model(self, model: Model) -> None:
        if self.data is None:
            raise ConfigError("Distill: give data= (an iterable of batches, e.g. a DataLoader).")
        if isinstance(self.data, (str, bytes)) or not hasattr(self.data, "__iter__"):
            raise ConfigError(f"Distill: data must be an iterable of batches, got {type(self.data).__name__}.")
        if self.teacher is None:
            raise ConfigError("Distill: give teacher= (the model before pruning/quantization), or put Distill "
                              "after Prune in a Pipeline, where that model is the default teacher.")
        teacher_module(self.teacher)
        for name in ("eval_fn", "loss_fn"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise ConfigError(f"Distill: {name} must be callable, got {type(getattr(self, name)).__name__}.")

    # ------------------------------------------------------------------ pipeline
    def in_pipeline(self, before: Sequence[tuple[Pass, Model]]) -> Distill:
        """This pass with its default teacher: the model before the last Prune run so far in the
        pipeline, else the pipeline's input. ``before`` is ``(pass, model it was given)`` in order."""
        if self.teacher is not None or not before:
            return self
        from .prune import Prune

        teacher = next((m for p, m in reversed(before) if isinstance(p, Prune)), before[0][1])
        return replace(self, teacher=teacher)

    # ------------------------------------------------------------------ work
    def run(self, model: Model) -> tuple[Any, dict[str, Any]]:
        from ._distill_train import train

        teacher = copy.deepcopy(teacher_module(self.teacher))  # never moved or changed in place
        student, details = train(self, model, teacher)
        return student, details


def teacher_module(teacher: Any) -> nn.Module:
    """The teacher's nn.Module; refuses formats that cannot run inside a training step."""
    from ..model import Model
    from ..runtime.torch_module import unwrap

    if isinstance(teacher, Model):
        if teacher.format != "torch":
            raise UnsupportedModelError(
                f"Distill: the teacher is in format {teacher.format!r}, which cannot run inside a PyTorch "
                "training step. Use the teacher as a PyTorch model (format 'torch'), i.e. the model before "
                "Export.")
        return unwrap(teacher.artifact)
    if isinstance(teacher, nn.Module):
        return unwrap(teacher)
    raise UnsupportedModelError(f"Distill: teacher must be an ao.Model or torch.nn.Module, got "
                                f"{type(teacher).__name__}.")


def distill(student: Model, teacher: Any, data: Any, epochs: int = 1, *, name: str | None = None,
            **settings: Any) -> Model:
    """One-line form of ``Distill(epochs, teacher=teacher, data=data, **settings).apply(student)``;
    ``name=`` labels the result."""
    return named(Distill(epochs, teacher=teacher, data=data, **settings).apply(student), name)
