"""One progress-bar rule for long work (calibration, distillation, benchmarking, pipelines).

``verbose=None`` (the default everywhere) lets tqdm decide: shown on a terminal, silent when
stderr is not one (CI logs, notebooks' captured output); ``False`` hides it; ``True`` shows it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["progress_bar"]


def progress_bar(total: int | None = None, *, desc: str | None = None, unit: str = "it", initial: int = 0,
                 verbose: bool | None = None, leave: bool = False) -> Any:
    """A ``tqdm`` bar (tqdm is a required dependency) following the rule above, or None with
    ``verbose=False`` (so a caller can skip the work of describing progress too)."""
    if verbose is False:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, initial=initial, leave=leave,
                disable=None if verbose is None else not verbose)
