"""Extraction: one frozen forward pass over a dataset into a self-describing HDF5 cache (:mod:`vtbench.cache`)."""

from vtbench.extract.run import ExtractReport, extract

__all__ = ["extract", "ExtractReport"]
