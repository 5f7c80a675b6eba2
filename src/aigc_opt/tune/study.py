"""The Optuna side: budgets, the study and its storage, what each trial samples, and resuming.

A study is created (or, with ``storage=``, reopened) under one name; its user attributes hold a
fingerprint of the model, the target and the workload, so a storage file written for another
model is refused instead of mixing trials. Each trial's outcome is stored on it as a user
attribute, so a resumed run reads every finished trial back without running it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._deps import require
from ..errors import ConfigError
from .space import NONE, Candidates, Variant

if TYPE_CHECKING:
    from ..model import Model

__all__ = ["parse_budget", "fingerprint", "open_study", "suggest", "stored_outcomes", "anchor_params", "STUDY_NAME"]

STUDY_NAME = "aigc_opt-tune"
FINGERPRINT_VERSION = 1
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_budget(budget: Any) -> float:
    """``"20m"``, ``"90s"``, ``"1h"``, ``"1h30m"`` or a number of seconds -> seconds."""
    if isinstance(budget, (int, float)) and not isinstance(budget, bool):
        seconds = float(budget)
    elif isinstance(budget, str) and (parts := re.findall(r"(\d+(?:\.\d+)?)\s*(h|min|m|sec|s)", budget.strip())) \
            and re.fullmatch(r"(\s*\d+(?:\.\d+)?\s*(h|min|m|sec|s))+\s*", budget):
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    else:
        raise ConfigError(f"budget={budget!r} is not a duration; write e.g. '20m', '90s', '1h' or a number of seconds.")
    if not math.isfinite(seconds) or seconds <= 0 or seconds > 30 * 86400:
        raise ConfigError(f"budget={budget!r} must be between 0 and 30 days, e.g. '20m'.")
    return seconds


def fingerprint(model: Model, workload: list[Any]) -> dict[str, str]:
    """What a stored study must match: the model's weights (or artifact), target and workload shapes."""
    from .._tree import describe

    h = hashlib.sha256(f"{model.format}|{type(model.artifact).__name__}".encode())
    state = getattr(getattr(model.artifact, "_orig_mod", model.artifact), "state_dict", None)
    if callable(state):
        for k, v in state().items():
            h.update(k.encode())
            t = v.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            try:
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            except (RuntimeError, TypeError):  # a tensor subclass: its shape and dtype stand for it
                pass
    else:
        h.update(str(model.size_bytes()).encode())
        h.update(model.label.encode())
    shapes = hashlib.sha256("|".join(describe(b) for b in workload).encode()).hexdigest()[:16]
    return {"version": str(FINGERPRINT_VERSION), "model": h.hexdigest()[:24], "model_name": model.name,
            "target": model.target.name, "workload": shapes}


def _storage_url(storage: Any) -> Any:
    if storage is None or not isinstance(storage, (str, Path)):
        return storage
    text = str(storage)
    if "://" in text:
        return text
    path = Path(text).expanduser().resolve()
    if path.is_dir():
        raise ConfigError(f"storage={text!r} is a directory; give a file such as 'tune.db' (SQLite) or a URL.")
    return f"sqlite:///{path}"


def open_study(storage: Any, fp: dict[str, str], *, seed: int) -> Any:
    """Create or reopen the study; refuse a stored study made for another model, target or workload."""
    optuna = require("optuna", extra="tune", purpose="ao.tune")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna's ExperimentalWarning for multivariate TPE
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True, n_startup_trials=6)
    try:
        study = optuna.create_study(storage=_storage_url(storage), study_name=STUDY_NAME, load_if_exists=True,
                                    directions=["minimize", "minimize"], sampler=sampler)
    except ValueError as e:  # directions differ: a study of some other tool under our name
        raise ConfigError(f"storage={storage!r} holds a study {STUDY_NAME!r} that is not an ao.tune study ({e}); "
                          "give another storage file.") from None
    stored = study.user_attrs.get("aigc_opt")
    if stored is None:
        study.set_user_attr("aigc_opt", fp)
    elif stored != fp:
        diff = [k for k in fp if stored.get(k) != fp[k]]
        raise ConfigError(
            f"storage={storage!r} holds a tune study of another {'/'.join(diff)} (stored: model "
            f"{stored.get('model_name')!r} on {stored.get('target')!r}; now: {fp['model_name']!r} on {fp['target']!r}). "
            "A study resumes only for the same model, target and workload: give a new storage file for this one.")
    return study


def suggest(trial: Any, cands: Candidates) -> tuple[Variant, ...]:
    """The recipe a trial samples: a prune variant, a route, then that route's quantize and compile."""
    prune = _pick(trial, "prune", cands.prune)
    route = cands.routes[trial.suggest_categorical("route", list(cands.routes))]
    quant = _pick(trial, f"quantize|{route.label}", cands.quantize[route.label])
    comp = _pick(trial, f"compile|{route.label}", cands.compile[route.label])
    return prune, route, quant, comp


def _pick(trial: Any, name: str, variants: list[Variant]) -> Variant:
    if len(variants) == 1:
        return variants[0]
    label = trial.suggest_categorical(name, [v.label for v in variants])
    return next(v for v in variants if v.label == label)


def all_params(cands: Candidates) -> list[dict[str, Any]]:
    """Every recipe of the space as the parameters :func:`suggest` reads (stages with one
    variant take no parameter)."""
    out = []
    prunes = [{"prune": v.label} if len(cands.prune) > 1 else {} for v in cands.prune]
    for r in cands.routes:
        quants = [{f"quantize|{r}": v.label} if len(cands.quantize[r]) > 1 else {} for v in cands.quantize[r]]
        comps = [{f"compile|{r}": v.label} if len(cands.compile[r]) > 1 else {} for v in cands.compile[r]]
        out += [{**p, "route": r, **q, **c} for p in prunes for q in quants for c in comps]
    return out


def anchor_params(cands: Candidates, target: Any, fmt: str, *, decoder: bool = False,
                  calibrated: bool = True) -> list[tuple[dict[str, Any], str]]:
    """First trials, one per route, from the registries and the target: the route's
    ``Quantize("auto")`` resolution (``AUTO_RULES`` for the route's format; none when no rule fits
    or the space lacks the method) and its default compile backend (the first registered backend
    native to the route's format, at default settings). ``(params, why)`` each; with short budgets
    the sampler alone may never reach a route's obvious recipe."""
    from ..passes import COMPILE_BACKENDS
    from ..passes._quant_auto import choose_method

    out = []
    for r, route in cands.routes.items():
        after = fmt
        for p in route.passes:
            after = p.output_format(after)
        params: dict[str, Any] = {"route": r}
        try:
            method, _ = choose_method(target, after, decoder=decoder and after != "torch", calibrated=calibrated)
        except Exception:  # no rule fits this target and format
            method = None
        quant = next((v for v in cands.quantize[r] if v.passes and v.passes[0].method == method), None)
        comp = next((v for v in cands.compile[r] if v.passes and after in COMPILE_BACKENDS.get(v.passes[0].backend).formats
                     and COMPILE_BACKENDS.get(v.passes[0].backend).output_format in (None, after)), None)
        if len(cands.quantize[r]) > 1:
            params[f"quantize|{r}"] = quant.label if quant else NONE
        if len(cands.compile[r]) > 1:
            params[f"compile|{r}"] = comp.label if comp else NONE
        if len(cands.prune) > 1:
            params["prune"] = NONE
        why = (f"{r}: Quantize('auto') on {target.name} for {after} -> {quant.label if quant else 'none'}; "
               f"compile {comp.label if comp else 'none'}")
        out.append((params, why))
    return out


def stored_outcomes(study: Any) -> dict[str, tuple[int, list[dict[str, Any]], dict[str, Any]]]:
    """recipe key -> (trial number, passes, outcome) for every finished trial in the study."""
    out = {}
    for t in study.get_trials(deepcopy=False):
        outcome = t.user_attrs.get("outcome")
        key = t.user_attrs.get("recipe")
        if outcome and key and key not in out and not t.user_attrs.get("repeat_of"):
            out[key] = (t.number, json.loads(t.user_attrs.get("passes", "[]")), outcome)
    return out


def tell(study: Any, trial: Any, key: str, passes: list[dict[str, Any]], outcome: dict[str, Any],
         repeat_of: int | None = None) -> None:
    """Store the outcome on the trial and finish it: values for complete trials, PRUNED for
    over-budget ones (not timed), FAIL for refused and failed ones."""
    optuna = require("optuna", extra="tune", purpose="ao.tune")
    plain = {k: v for k, v in outcome.items() if k != "model"}
    trial.set_user_attr("recipe", key)
    trial.set_user_attr("passes", json.dumps(passes))
    trial.set_user_attr("outcome", plain)
    if repeat_of is not None:
        trial.set_user_attr("repeat_of", repeat_of)
    state = outcome["state"]
    if state == "complete":
        study.tell(trial, [outcome["latency_ratio"][0], outcome["drop"]])
    elif state in ("over-budget", "skipped"):  # not timed: beyond max_drop, or ruled out by a prefix
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    else:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    logging.getLogger("aigc_opt").info("tune trial %d: %s -> %s", trial.number, key, state)
