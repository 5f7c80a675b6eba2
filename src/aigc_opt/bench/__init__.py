"""Measuring: ``benchmark`` one model, ``compare`` candidates against a baseline."""

from .compare import benchmark, compare
from .fidelity import Fidelity
from .generation import GenerationReport, GenerationStats, generation
from .image_generation import ImageGenerationReport, ImageStats, image_generation
from .measurement import Measurement
from .report import Entry, Report

__all__ = ["benchmark", "compare", "generation", "Measurement", "Fidelity", "Report", "Entry",
           "GenerationReport", "GenerationStats", "image_generation", "ImageGenerationReport", "ImageStats"]
