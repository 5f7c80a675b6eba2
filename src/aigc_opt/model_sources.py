"""Where Models come from besides an ``nn.Module``: a registry of constructors by source name.

``Model.from_hf(...)`` and ``Model.from_gguf(...)`` look their constructor up here, so that Core
(model.py) does not import the modules that build them (hf.py, which imports model.py back); those
modules register themselves when ``aigc_opt`` is imported. A plugin can add a source the same way.

Example:
    >>> from aigc_opt.model_sources import MODEL_SOURCES
    >>> sorted(MODEL_SOURCES.names())                  # doctest: +SKIP
    ['gguf', 'hf']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ._registry import Registry

__all__ = ["MODEL_SOURCES"]

MODEL_SOURCES: Registry[Callable[..., Any]] = Registry("model source")


def _lazy_source(module: str, function: str) -> Callable[..., Any]:
    """A source whose module pulls an optional backend: imported on the first call, so that
    ``import aigc_opt`` stays light (the name is resolved with importlib: Core imports no front door)."""

    def load(*args: Any, **kwargs: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), function)(*args, **kwargs)

    load.__qualname__ = load.__name__ = f"{module}.{function}"
    return load


# Model.from_diffusers (extra [diffusion]): aigc_opt.diffusion imports diffusers only when used.
MODEL_SOURCES.register("diffusers", _lazy_source("aigc_opt.diffusion", "from_diffusers"))
