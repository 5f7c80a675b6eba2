"""Recipe search: the fastest recipe for this model, target and workload within an accuracy budget.

``ao.tune(model, workload=..., eval_fn=..., max_drop=0.01, budget="20m")`` searches the recipes
the pass registries allow on the target (Optuna, multi-objective: latency ratio and fidelity),
times each against the baseline with ``ao.compare``'s interleaved protocol, and returns a
:class:`TuneResult`: every trial, the Pareto front, the chosen recipe and ``result.best``.
Needs the ``[tune]`` extra (optuna); ``executor="ray"`` the ``[ray]`` extra.

Example:
    >>> import aigc_opt as ao, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).eval()
    >>> m = ao.Model(net, example_inputs=(torch.randn(32, 64),))
    >>> result = ao.tune(m, max_drop=0.01, budget="2m", space=ao.tune.Space(prune=()))  # doctest: +SKIP
    >>> result.recipe.save("recipe.yaml")                                                  # doctest: +SKIP
    >>> wl = ao.tune.GenerationWorkload(prompts=["def fib(n):"], max_new_tokens=32)         # doctest: +SKIP
    >>> ao.tune(lm, workload=wl, max_drop=0.02, budget="20m")  # decode ms/token vs next-token agreement  # doctest: +SKIP
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .generation import GenerationWorkload
from .result import Trial, TuneResult, pareto_front
from .search import Tune, tune
from .space import Space

__all__ = ["tune", "Tune", "TuneResult", "Trial", "Space", "GenerationWorkload", "pareto_front"]


class _CallableModule(types.ModuleType):
    """``ao.tune`` is this package once ``import aigc_opt.tune`` ran (Python binds the submodule
    to the parent's attribute), and the function before; calling either searches."""

    def __call__(self, *args: Any, **kwargs: Any) -> TuneResult:
        return tune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
# ``ao.tune`` resolves to the function: give it the package's names too (``ao.tune.Space``).
for _name in ("Tune", "TuneResult", "Trial", "Space", "GenerationWorkload", "pareto_front"):
    setattr(tune, _name, globals()[_name])
