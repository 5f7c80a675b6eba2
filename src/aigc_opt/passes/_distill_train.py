"""The distillation training loop: AdamW, warm-up + cosine schedule, clipping, eval/best weights,
atomic checkpoints written by rank 0, resume, and DDP / FSDP under ``torchrun``.

Joining torchrun's process group, the DDP / FSDP wrapping and the (gathered) states a checkpoint
holds live in ``_distill_distributed``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .._progress import progress_bar
from .._tree import map_tensors, normalize_inputs
from ..errors import ConfigError, InvalidInputError, PassError
from . import _distill_losses as L
from ._distill_distributed import (
    CHECKPOINT_FILE,
    atomic_save,
    checkpoint_path,
    full_state,
    init_from_torchrun,
    load_full_state,
    mean_across,
    optimizer_state,
    student_state,
    world,
    wrap,
)

if TYPE_CHECKING:
    from ..model import Model
    from .distill import Distill

__all__ = ["train", "split_batch", "world", "CHECKPOINT_FILE"]

log = logging.getLogger("aigc_opt")


# ---------------------------------------------------------------------- data
def split_batch(batch: Any, labeled: bool) -> tuple[Any, Any]:
    """``(inputs, labels)``: ``(x, y)`` pairs when ``labeled``, a dict's ``labels`` key, else no labels."""
    if labeled:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise InvalidInputError(f"Distill: labeled=True takes batches as (inputs, labels) pairs, got "
                                    f"{type(batch).__name__}{'' if not hasattr(batch, '__len__') else f' of length {len(batch)}'}.")
        return normalize_inputs(batch[0], what="Distill batch"), batch[1]
    if isinstance(batch, dict) and "labels" in batch:
        rest = {k: v for k, v in batch.items() if k != "labels"}
        return rest, batch["labels"]
    return normalize_inputs(batch, what="Distill batch"), None


def _batches(data: Any, rank: int, size: int) -> list[Any]:
    """This rank's batches of one epoch: every ``size``-th, the tail that not all ranks get dropped."""
    items = list(data)
    if not items:
        raise InvalidInputError("Distill: data gave no batches; pass a non-empty iterable of batches "
                                "(e.g. a DataLoader) that can be iterated once per epoch.")
    usable = len(items) // size * size
    if usable == 0:
        raise InvalidInputError(f"Distill: data gave {len(items)} batch(es) for {size} processes; each "
                                "process needs at least one.")
    return items[rank:usable:size]


# ---------------------------------------------------------------------- the loop
def _to_fp32(t: torch.Tensor) -> torch.Tensor:
    return t.float() if t.is_floating_point() else t


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def train(cfg: Distill, model: Model, teacher: nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    """Train a copy of ``model``'s module against ``teacher``; returns (student, details)."""
    from ..runtime.torch_module import module_device, unwrap

    started = init_from_torchrun()
    try:
        return _train(cfg, model, teacher, unwrap(model.artifact), module_device)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()


_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(cfg: Distill, target: Any, device: torch.device) -> tuple[str, str]:
    """(precision, why): the autocast dtype the training forward passes run in."""
    if cfg.precision != "auto":
        native = target.supports_dtype(cfg.precision) or cfg.precision == "fp32"
        return cfg.precision, "asked" + ("" if native else f" (target {target.name!r} has no native {cfg.precision})")
    if device.type != "cuda":
        return "fp32", "auto: CPU training stays fp32 (autocast gains little there and costs accuracy)"
    for name in ("bf16", "fp16"):
        if target.supports_dtype(name):
            return name, f"auto: target {target.name!r} runs {name} natively"
    return "fp32", f"auto: target {target.name!r} lists neither bf16 nor fp16"


@dataclass
class _Run:
    """Everything one distillation run carries from step to step (and into a checkpoint)."""

    cfg: Distill
    device: torch.device
    rank: int
    size: int
    amp_dtype: torch.dtype | None
    pairs: list[tuple[str, str]]
    teacher: nn.Module
    t_tap: Any
    trainee: Any = None
    wrapped: nn.Module | None = None
    optimizer: Any = None
    scheduler: Any = None
    scaler: Any = None
    start_epoch: int = 0
    step: int = 0
    best_score: float | None = None
    best_state: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    last_good: str | None = None
    first_epoch: list[Any] = field(default_factory=list)  # epoch 1's batches, listed once before seeding
    total: int = 0  # optimizer steps over all epochs

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def to_device(self, tree: Any) -> Any:
        return map_tensors(lambda t: t.to(self.device), tree)

    def teacher_forward(self, inputs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
        if self.t_tap is not None:
            self.t_tap.values.clear()
        with torch.no_grad(), self.autocast():
            out = L.run_module(self.teacher, inputs)
        return out, {t: self.t_tap.values.get(t) for _, t in self.pairs} if self.t_tap else {}


def _train(cfg: Distill, model: Model, teacher: nn.Module, source: nn.Module,
           module_device: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Distill ``source`` (a copy of it) from ``teacher``; the caller's random state is untouched
    (seeds are set inside ``fork_rng``, so a run is reproducible without changing the user's)."""
    rank, size = world()
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
              if size > 1 and torch.cuda.is_available() else module_device(source))
    precision, precision_reason = resolve_precision(cfg, model.target, device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        batches = _batches(cfg.data, rank, size)  # read once: a DataLoader may shuffle with the caller's seed
        run, student, widths = _start(cfg, teacher, source, device, batches, _AUTOCAST_DTYPES.get(precision))
        _resume(run)
        _epochs(run, model)
    final = student_state(run.wrapped, run.trainee, cfg.strategy, size)
    result = copy.deepcopy(source)
    result.load_state_dict(run.best_state if run.best_state is not None else final)
    result.eval()
    details = {"epochs": cfg.epochs, "steps": run.step, "world_size": size,
               "strategy": cfg.strategy if size > 1 else "single", "history": run.history,
               "precision": precision, "precision_reason": precision_reason,
               "final_loss": run.history[-1]["loss"] if run.history else None, "best_score": run.best_score,
               "projections": {s: list(w) for s, w in widths.items() if w[0] != w[1]}}
    return result, details


def _start(cfg: Distill, teacher: nn.Module, source: nn.Module, device: torch.device, batches: list[Any],
           amp_dtype: torch.dtype | None) -> tuple[_Run, nn.Module, dict[str, tuple[int, int]]]:
    """The student, the projections, the optimizer: after one forward on the first batch has shown
    that student and teacher outputs (and the paired features) can be compared."""
    pairs = [tuple(p) for p in cfg.feature_layers]
    teacher = teacher.to(device).eval()
    rank, size = world()
    run = _Run(cfg=cfg, device=device, rank=rank, size=size, amp_dtype=amp_dtype, pairs=pairs, teacher=teacher,
               t_tap=L.FeatureTap(teacher, [t for _, t in pairs], "teacher") if pairs else None,
               first_epoch=batches, total=cfg.epochs * len(batches))
    torch.manual_seed(cfg.seed)
    student = copy.deepcopy(source).to(device)
    first_inputs = run.to_device(split_batch(batches[0], cfg.labeled)[0])
    s_tap = L.FeatureTap(student, [s for s, _ in pairs], "student") if pairs else None
    with torch.no_grad():
        s_out = L.run_module(student.eval(), first_inputs)
    s_feats = dict(s_tap.values) if s_tap else {}
    if s_tap:
        s_tap.remove()
    t_out, t_feats = run.teacher_forward(first_inputs)
    suggest = lambda: repr(L.suggest_pairs(student, teacher, first_inputs))  # noqa: E731
    widths = L.check_comparable(cfg.output_loss, s_out, t_out, s_feats, t_feats, pairs, suggest)

    torch.manual_seed(cfg.seed)  # projections start the same on every rank and every run
    run.trainee = L.Trainee(student, pairs, widths).to(device)
    run.wrapped = wrap(run.trainee, cfg.strategy, device) if size > 1 else run.trainee
    decay = [p for n, p in run.wrapped.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in run.wrapped.named_parameters() if p.ndim < 2]
    run.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    total, warmup = run.total, int(cfg.warmup_ratio * run.total)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda s: _schedule(s, total, warmup))
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
    run.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16 and device.type == "cuda")
    return run, student, widths


def _resume(run: _Run) -> None:
    """Continue from ``resume_from``'s checkpoint: weights, optimizer, schedule, history."""
    cfg = run.cfg
    if not cfg.resume_from:
        return
    path = checkpoint_path(cfg.resume_from)
    if not path.is_file():
        raise ConfigError(f"Distill: resume_from={str(cfg.resume_from)!r} has no checkpoint ({path} is "
                          "missing); give the checkpoint_dir of an earlier run.")
    ck = torch.load(path, map_location="cpu", weights_only=True)
    load_full_state(run.wrapped, run.trainee, ck["trainee"], cfg.strategy, run.size)
    if run.size > 1 and cfg.strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(run.wrapped, run.optimizer, ck["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        run.optimizer.load_state_dict(ck["optimizer"])
    run.scheduler.load_state_dict(ck["scheduler"])
    run.start_epoch, run.step, run.best_score, run.best_state = (
        ck["epoch"], ck["step"], ck["best_score"], ck["best_state"])
    run.history = list(ck["history"])
    log.info("Distill: resumed from %s after epoch %d (step %d)", path, run.start_epoch, run.step)


def _epochs(run: _Run, model: Model) -> None:
    """The training loop: every epoch's steps, its evaluation and its checkpoint."""
    cfg = run.cfg
    bar = progress_bar(run.total, initial=run.step, unit="step", desc="Distill",
                       verbose=cfg.verbose if run.rank == 0 else False)
    position = [0, 0]  # epoch, batch: for the BatchNorm guard's message
    guards = _batchnorm_guards(run.trainee.student, position)
    try:
        for epoch in range(run.start_epoch, cfg.epochs):
            torch.manual_seed(cfg.seed + epoch)  # dropout and shuffling: the same with or without resume
            run.wrapped.train()
            run.trainee.student.train()
            running, count = 0.0, 0
            for i, batch in enumerate(_batches(cfg.data, run.rank, run.size) if epoch else run.first_epoch):
                position[:] = [epoch + 1, i + 1]
                shown = _step(run, batch, epoch, i)
                running, count = running + shown, count + 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{shown:.4f}", epoch=epoch + 1)
            _end_epoch(run, model, epoch, running / max(1, count))
    finally:
        if bar is not None:
            bar.close()
        for guard in guards:
            guard.remove()
        for tap in (run.t_tap, run.trainee.tap):
            if tap is not None:
                tap.remove()


def _step(run: _Run, batch: Any, epoch: int, index: int) -> float:
    """One optimizer step on one batch; returns the loss (averaged across ranks)."""
    cfg = run.cfg
    inputs, labels = split_batch(batch, cfg.labeled)
    inputs = run.to_device(inputs)
    labels = run.to_device(labels) if labels is not None else None
    t_out, t_feats = run.teacher_forward(inputs)
    with run.autocast():
        s_out, s_feats = run.wrapped(inputs)
    # the loss in fp32: KL/softmax over low-precision logits loses the small differences
    if run.amp_dtype is not None:
        s_out, t_out, s_feats, t_feats = map_tensors(_to_fp32, (s_out, t_out, s_feats, t_feats))
    loss = _loss(cfg, s_out, t_out, s_feats, t_feats, labels, run.pairs)
    shown = mean_across(loss, run.size)
    if not torch.isfinite(shown):
        where = f"last good checkpoint: {run.last_good}" if run.last_good else "no checkpoint was written"
        raise PassError(f"Distill: loss became {shown.item()} at step {run.step + 1} (epoch {epoch + 1}, "
                        f"batch {index + 1}); training stopped, the input model is unchanged, {where}. "
                        f"Try a lower lr (now {cfg.lr}) or max_grad_norm (now {cfg.max_grad_norm}).")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if cfg.max_grad_norm:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.wrapped.parameters(), cfg.max_grad_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.step += 1
    return shown.item()


def _end_epoch(run: _Run, model: Model, epoch: int, mean_loss: float) -> None:
    """Evaluate (keeping the best student), log, and write the checkpoint."""
    cfg = run.cfg
    entry: dict[str, Any] = {"epoch": epoch + 1, "loss": mean_loss}
    if cfg.eval_fn is not None:
        score = _evaluate(cfg, model, run.trainee, run.wrapped, run.size)
        entry["score"] = score
        if run.best_score is None or score > run.best_score:
            run.best_score, run.best_state = score, student_state(run.wrapped, run.trainee, cfg.strategy, run.size)
    run.history.append(entry)
    log.info("Distill epoch %d/%d: %s", epoch + 1, cfg.epochs, entry)
    if cfg.checkpoint_dir is None:
        return
    path = Path(cfg.checkpoint_dir) / CHECKPOINT_FILE
    state = full_state(run.wrapped, run.trainee, cfg.strategy, run.size)  # collective under FSDP
    optim = optimizer_state(run.wrapped, run.optimizer, cfg.strategy, run.size)
    if run.rank == 0:
        atomic_save({"epoch": epoch + 1, "step": run.step, "trainee": state, "optimizer": optim,
                      "scheduler": run.scheduler.state_dict(), "best_score": run.best_score,
                      "best_state": run.best_state, "history": run.history, "config": cfg.config_dict()}, path)
    run.last_good = str(path)


def _batchnorm_guards(student: nn.Module, position: list[int]) -> list[Any]:
    """Forward pre-hooks refusing a training batch that gives a BatchNorm one value per channel.

    Batch statistics need two values or more; torch's own ValueError names neither the layer nor
    the batch, and would surface as an untyped PassError."""
    def guard(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if module.training and isinstance(x, torch.Tensor) and x.dim() >= 2 and x.numel() == x.shape[1]:
                raise InvalidInputError(
                    f"Distill: BatchNorm layer {name!r} gets one value per channel (input shape {tuple(x.shape)}) "
                    f"at epoch {position[0]}, batch {position[1]}; training needs two or more to compute batch "
                    "statistics. Use batches of 2 or more samples (or inputs large enough that this layer sees "
                    "more than one position).")
        return hook

    return [m.register_forward_pre_hook(guard(n)) for n, m in student.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _loss(cfg: Distill, s_out: Any, t_out: Any, s_feats: dict[str, torch.Tensor],
          t_feats: dict[str, torch.Tensor], labels: Any, pairs: list[tuple[str, str]]) -> torch.Tensor:
    s_out_main = L.main_output(s_out)
    kd = (L.kd_output_loss(cfg.output_loss, s_out_main, L.main_output(t_out), cfg.temperature)
          if cfg.output_loss != "none" else s_out_main.new_zeros(()))
    for s, t in pairs:
        kd = kd + cfg.feature_weight * L.feature_loss(cfg.feature_loss, s_feats[s], t_feats[t])
    if cfg.loss_fn is not None:
        task = cfg.loss_fn(s_out, labels)
    elif labels is not None:
        logits = s_out_main
        task = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
    else:
        return kd
    return cfg.alpha * kd + (1 - cfg.alpha) * task


def _evaluate(cfg: Distill, model: Model, trainee: nn.Module, wrapped: nn.Module, size: int) -> float:
    """``eval_fn`` on the student as an ao.Model; every rank runs it, rank 0's score is used."""
    trainee.eval()
    try:
        student = trainee.student
        if size > 1 and cfg.strategy == "fsdp":  # sharded weights: evaluate a full copy
            student = copy.deepcopy(unwrap_source(model)).to(next(trainee.parameters()).device.type)
            student.load_state_dict(student_state(wrapped, trainee, cfg.strategy, size))
            student.eval()
        with torch.no_grad():
            score = float(cfg.eval_fn(model.derive(student)))
    finally:
        trainee.train()
    if size > 1:
        import torch.distributed as dist

        value = torch.tensor([score], dtype=torch.float64, device=next(trainee.parameters()).device)
        dist.broadcast(value, 0)
        score = float(value.item())
    return score


def unwrap_source(model: Model) -> nn.Module:
    from ..runtime.torch_module import unwrap

    return unwrap(model.artifact)
