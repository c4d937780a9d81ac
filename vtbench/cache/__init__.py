"""The feature cache layer, between extraction and everything that reads features.

- :mod:`vtbench.cache.store`: the HDF5 file (layout, key, crash-safe writer, lock, reader, verify);
- :mod:`vtbench.cache.index`: what is cached under a root, each file's metadata read once;
- :mod:`vtbench.cache.select`: picking caches by model, weights, settings and data (:func:`find_cache`),
  and the caches of one evaluation by split (:class:`CacheSet`).
"""

from vtbench.cache.index import list_caches, unreadable_caches
from vtbench.cache.select import CacheSet, check_compatible, find_cache, same_data
from vtbench.cache.store import FeatureCache, open_cache, read_meta, verify_cache, write_cache

__all__ = ["CacheSet", "FeatureCache", "check_compatible", "find_cache", "list_caches", "open_cache", "read_meta",
           "same_data", "unreadable_caches", "verify_cache", "write_cache"]
