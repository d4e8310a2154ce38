"""Compute-to-data sandbox for de-identified health datasets."""

__version__ = "0.1.0"
