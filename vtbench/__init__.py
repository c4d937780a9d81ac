"""vtbench: how good are a frozen vision backbone's features, block by block, on datasets it never saw?

Data flow, one subpackage per stage::

    data      dataset registry: (image, label, image_id) per split
    models    timm backbones, weights (hub / checkpoint / random), transforms, token taps
    extract   one forward pass over a dataset -> HDF5 feature cache
    cache     the cache files, the index of what is cached, picking caches (open_cache reads one)
    settings  how features were made (FeatureSettings): identity, matching, labels, options
    transfer  linear probes and k-NN on cached token ensembles
    fewshot   Meta-Dataset-style episodes on cached features
    results   the results store (one JSON per result)
    report    leaderboard tables and plots
    suite     `vt run`: a grid of the above from a YAML file
    cli       the `vt` command, a thin layer over the above
"""

__version__ = "0.1.0"

from vtbench.errors import VTError  # noqa: E402
from vtbench.cache import FeatureCache, open_cache  # noqa: E402
from vtbench.tokens import parse_spec  # noqa: E402

__all__ = ["VTError", "FeatureCache", "open_cache", "parse_spec", "__version__"]
