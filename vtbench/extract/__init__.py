"""Extraction: one frozen forward pass over a dataset into a self-describing HDF5 cache."""

from vtbench.extract.cache import FeatureCache, find_cache, list_caches, open_cache, write_cache
from vtbench.extract.run import ExtractReport, extract

__all__ = ["extract", "ExtractReport", "FeatureCache", "open_cache", "find_cache", "list_caches", "write_cache"]
