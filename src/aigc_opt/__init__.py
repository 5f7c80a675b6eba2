"""aigc_opt: make trained models smaller and faster for a named piece of hardware, and prove it.

Example:
    >>> import aigc_opt as ao, torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    >>> m = ao.Model(net.eval(), example_inputs=(torch.randn(8, 64),), target="host")
    >>> q = ao.quantize(m, "int8-dynamic")          # a new Model; m is untouched
    >>> report = ao.compare(m, q, iters=20)         # doctest: +SKIP
    >>> print(report)                               # doctest: +SKIP

``import aigc_opt`` needs only torch and numpy; every optional backend is imported when used.
"""

from . import errors, hf  # noqa: F401  (hf registers Model.from_hf / from_gguf's sources)
from ._version import __version__
from .bench import Fidelity, Measurement, Report, benchmark, compare
from .model import Model
from .passes import (
    COMPILE_BACKENDS,
    EXPORTERS,
    PASS_TYPES,
    PRUNE_METHODS,
    QUANT_METHODS,
    Compile,
    Distill,
    Export,
    Pass,
    PassRecord,
    Prune,
    Quantize,
    compile,
    distill,
    export,
    prune,
    quantize,
)
from .pipeline import Pipeline
from .target import Target

__all__ = [
    "__version__",
    "errors",
    "Model",
    "Target",
    "Pass",
    "PassRecord",
    "Pipeline",
    "Quantize",
    "quantize",
    "Compile",
    "compile",
    "QUANT_METHODS",
    "Export",
    "export",
    "Prune",
    "prune",
    "Distill",
    "distill",
    "PRUNE_METHODS",
    "EXPORTERS",
    "COMPILE_BACKENDS",
    "PASS_TYPES",
    "benchmark",
    "compare",
    "Measurement",
    "Fidelity",
    "Report",
]


# Imported on first use: each pulls an optional backend (optuna, ray, prometheus-client, diffusers).
_LAZY = {
    "tune": ("aigc_opt.tune", "tune"),
    "Tune": ("aigc_opt.tune", "Tune"),
    "TuneResult": ("aigc_opt.tune", "TuneResult"),
    "monitor": ("aigc_opt.monitor", "monitor"),
    "deploy": ("aigc_opt.deploy", None),
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'aigc_opt' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value
