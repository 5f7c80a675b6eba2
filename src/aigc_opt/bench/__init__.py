"""Measuring: ``benchmark`` one model, ``compare`` candidates against a baseline."""

from .compare import benchmark, compare
from .fidelity import Fidelity
from .measurement import Measurement
from .report import Entry, Report

__all__ = ["benchmark", "compare", "Measurement", "Fidelity", "Report", "Entry"]
