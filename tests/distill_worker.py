"""Helper for tests/test_distill.py: the same distillation, single-process or under torchrun.

    python -m torch.distributed.run --nproc_per_node=2 tests/distill_worker.py OUT_DIR [ddp|fsdp] [resume]

Each rank writes its final student weights to OUT_DIR/rank{R}.pt. ``problem()`` builds the
teacher, the (narrower) student and 8 batches of 16, deterministically, for both sides.
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

import aigc_opt as ao


def _mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, 5))


def problem() -> tuple[ao.Model, ao.Model, list[torch.Tensor]]:
    torch.manual_seed(0)
    teacher = ao.Model(_mlp(32).eval(), example_inputs=(torch.randn(4, 12),))
    student = ao.Model(_mlp(16).eval(), example_inputs=(torch.randn(4, 12),))
    data = [torch.randn(16, 12) for _ in range(8)]
    return student, teacher, data


SETTINGS = dict(epochs=2, lr=1e-2, temperature=2.0, feature_layers=[("1", "1")], verbose=False)


class StopInEpoch2:
    """Batches that break off when the second epoch starts, as a killed job would."""

    def __init__(self, data: list[torch.Tensor]):
        self.data, self.epochs = data, 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.epochs += 1
        if self.epochs > 1:
            raise RuntimeError("killed")
        return iter(self.data)


def main() -> None:
    from aigc_opt.passes.distill import distill

    from aigc_opt.errors import PassError

    out, strategy = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "ddp"
    student, teacher, data = problem()
    resume = {}
    if "resume" in sys.argv[3:]:  # break off in epoch 2 (every rank), then resume from epoch 1's checkpoint
        ck = os.path.join(out, "ck")
        try:
            distill(student, teacher, StopInEpoch2(data), strategy=strategy, checkpoint_dir=ck, **SETTINGS)
        except PassError as e:
            if "killed" not in str(e):
                raise
        resume = {"resume_from": ck}
    result = distill(student, teacher, data, strategy=strategy, **SETTINGS, **resume)
    rank = int(os.environ.get("RANK", "0"))
    torch.save(result.artifact.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    torch.save(result.history[-1].details["world_size"], os.path.join(out, f"world{rank}.pt"))


if __name__ == "__main__":
    main()
