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
