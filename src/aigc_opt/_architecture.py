"""How a saved torch Model's module is rebuilt without unpickling code from the save directory.

A saved ``format="torch"`` Model holds weights (``model.safetensors``, or ``weights.pt`` loaded with
``weights_only=True`` when the state dict has tensor subclasses)
and an *architecture spec* in its manifest: JSON that names a builder and its arguments. Loading
builds a fresh skeleton from the spec, replays the recorded passes' structural changes on it
(the ModelOpt convert/restore idea), then loads the weights into it.

Builders:
- ``"hf"``: a Hugging Face ``transformers`` model class and its config (only classes that
  ``transformers`` itself exports are accepted).
- ``"aigc_opt"``: modules defined by aigc_opt (e.g. the sentence-embedding wrapper).
- ``"factory"``: the user's own importable function; imported only with ``trust=True`` (a
  manifest could otherwise name any function), or replaced by ``Model.load(..., module=...)``.
- ``"custom"``: nothing to rebuild from; the user passes a skeleton with ``module=``, or
  ``trust=True`` to unpickle the ``module.pt`` saved beside the weights.
"""

from __future__ import annotations

import copy
import importlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from ._registry import Registry
from .errors import ConfigError, IntegrityError, UnsupportedModelError

__all__ = ["describe_architecture", "build_architecture", "AIGC_MODULES", "factory_path", "structure_only",
           "materialize"]

log = logging.getLogger("aigc_opt")

# aigc_opt's own module classes that can be rebuilt from JSON: name -> builder(**kwargs).
AIGC_MODULES: Registry[Callable[..., torch.nn.Module]] = Registry("aigc_opt module")


def factory_path(factory: Callable[..., Any] | str) -> str:
    """``"package.module:function"`` for an importable function, refusing lambdas and locals."""
    if isinstance(factory, str):
        if ":" not in factory:
            raise ConfigError(f"factory {factory!r} must look like 'package.module:function'.")
        return factory
    module, qualname = getattr(factory, "__module__", None), getattr(factory, "__qualname__", "")
    if not module or "<" in qualname or module == "__main__":
        raise ConfigError(
            f"factory {factory!r} cannot be imported again by name (it is a lambda, a local "
            "function or defined in __main__); move it into an importable module, or pass "
            "module=... to Model.load instead."
        )
    return f"{module}:{qualname}"


def describe_architecture(module: torch.nn.Module, factory: Callable[..., Any] | str | None = None,
                          factory_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON spec from which ``module``'s skeleton can be built again."""
    if factory is not None:
        return {"builder": "factory", "factory": factory_path(factory), "kwargs": dict(factory_kwargs or {})}
    spec = getattr(module, "aigc_architecture", None)
    if callable(spec):
        return {"builder": "aigc_opt", **spec()}
    # Import transformers only for its own models: it is heavy and optional.
    from_transformers = any(c.__module__.startswith("transformers.") for c in type(module).__mro__)
    if from_transformers and isinstance(module, _pretrained_model_class()):
        return {"builder": "hf", "class": type(module).__name__, "config": module.config.to_dict(),
                "attn_implementation": hf_attn_implementation(module.config)}
    cls = type(module)
    return {"builder": "custom", "class": f"{cls.__module__}.{cls.__qualname__}"}


def _pretrained_model_class() -> type:
    from transformers import PreTrainedModel

    return PreTrainedModel


def build_architecture(spec: dict[str, Any], *, trust: bool, max_bytes: int | None = None) -> torch.nn.Module:
    """Build the recorded architecture (weights not loaded yet).

    With ``max_bytes``, a recorded config (untrusted: it comes from a saved manifest) is first built
    on the meta device, which allocates nothing, and refused if its parameters and buffers would
    take more than ``max_bytes``: a config asking for a 400k-token vocabulary fails here, before
    gigabytes are allocated, not after."""
    if max_bytes is not None and spec.get("builder") in ("aigc_opt", "hf"):
        with torch.device("meta"):
            dry = _build(spec, trust=trust)
        need = sum(t.numel() * t.element_size() for t in (*dry.parameters(), *dry.buffers()))
        if need > max_bytes:
            raise IntegrityError(
                f"The recorded architecture ({spec.get('class') or spec.get('name')!r:.60}) would take "
                f"{need / 1e6:,.0f} MB, far more than its saved weights can fill ({max_bytes / 1e6:,.0f} MB at "
                "most); the manifest is damaged or was crafted. Nothing was allocated."
            )
    return _build(spec, trust=trust)


def _build(spec: dict[str, Any], *, trust: bool) -> torch.nn.Module:
    builder = spec.get("builder")
    if builder == "aigc_opt":
        return AIGC_MODULES.get(spec["name"])(**spec.get("kwargs", {}))
    if builder == "hf":
        return build_hf(spec["class"], spec["config"], spec.get("attn_implementation"))
    if builder == "factory":
        if not trust:
            raise UnsupportedModelError(
                f"This Model was saved from your own factory {spec['factory']!r}. Importing a function "
                "named in a file runs code, so it needs consent: pass trust=True if you trust this "
                "directory, or pass module=<a freshly built instance of the same architecture>."
            )
        mod_name, _, qualname = spec["factory"].partition(":")
        try:
            obj: Any = importlib.import_module(mod_name)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise UnsupportedModelError(
                f"The recorded factory {spec['factory']!r} cannot be imported here ({e}). Make its module "
                "importable (install it or add its folder to PYTHONPATH), or pass module=<an instance>."
            ) from None
        return obj(**spec.get("kwargs", {}))
    if builder == "custom":
        raise UnsupportedModelError(
            f"This Model was saved from a custom module of class {spec.get('class')!r}, which cannot be "
            "rebuilt from data. Either pass module=<a freshly built instance of that class> to "
            "Model.load, or trust=True to unpickle the saved module.pt (this runs code from the "
            "file: only for directories you trust). Saving with ao.Model(..., factory=...) also works."
        )
    raise UnsupportedModelError(f"Unknown architecture builder {builder!r} in the manifest.")


def hf_attn_implementation(config: Any) -> str | None:
    """The attention implementation a transformers config runs ("eager", "sdpa", ...), which
    ``config.to_dict()`` leaves out (a saved "eager" model would load as "sdpa")."""
    value = getattr(config, "_attn_implementation", None)
    return value if isinstance(value, str) else None


def build_hf(class_name: str, config: dict[str, Any], attn_implementation: str | None = None) -> torch.nn.Module:
    from ._deps import quiet_import_logs, require

    transformers = require("transformers", extra="hf", purpose="Loading a saved Hugging Face model")
    with quiet_import_logs():  # transformers imports its model modules (and torchao) lazily
        cls = getattr(transformers, class_name, None)
        if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
            raise UnsupportedModelError(
                f"{class_name!r} is not a transformers model class; the manifest may be damaged."
            )
        hf_config = cls.config_class.from_dict(config)
        if attn_implementation is None:  # saved before aigc_opt recorded it: transformers' default
            return cls(hf_config).eval()
        hf_config._attn_implementation = attn_implementation
        try:
            model = cls(hf_config)
        except (ImportError, ValueError) as e:
            # e.g. "flash_attention_2" saved on a GPU box, loaded where flash-attn is not installed:
            # the weights are the same whatever kernel runs them, so load with the default one.
            try:
                model = cls(cls.config_class.from_dict(config))
            except Exception:
                raise e from None
            log.warning("Model.load: %s was saved with attn_implementation=%r, which cannot run here (%s); "
                        "loaded with %r instead. Install what it needs to get it back.", class_name,
                        attn_implementation, str(e).splitlines()[0] if str(e) else type(e).__name__,
                        model.config._attn_implementation)
    return model.eval()


def structure_only(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` whose parameters and persistent buffers live on the meta device
    (no memory), kept so a custom module's structure can be pickled before any pass ran.
    Non-persistent buffers (not in the state dict, so not in the saved weights) stay real."""
    kept = {id(b) for m in module.modules() for name, b in m._buffers.items()
            if b is not None and name in m._non_persistent_buffers_set}
    memo: dict[int, Any] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) in kept or id(tensor) in memo:
            continue
        meta = tensor.detach().to("meta")
        memo[id(tensor)] = (torch.nn.Parameter(meta, requires_grad=tensor.requires_grad)
                            if isinstance(tensor, torch.nn.Parameter) else meta)
    return copy.deepcopy(module, memo)


def materialize(module: torch.nn.Module) -> torch.nn.Module:
    """Give a :func:`structure_only` module real (zero) CPU tensors, so passes can be
    replayed on it before the saved weights are loaded in."""
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, tensor in store.items():
                if tensor is not None and tensor.is_meta:
                    real = torch.zeros(tensor.shape, dtype=tensor.dtype)
                    store[name] = (torch.nn.Parameter(real, requires_grad=tensor.requires_grad)
                                   if isinstance(tensor, torch.nn.Parameter) else real)
    return module
