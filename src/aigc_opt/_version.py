"""The package version, in a leaf module so that Core (model.py) can record it without importing
the package ``__init__`` (which imports every pass)."""

__version__ = "0.1.0"
