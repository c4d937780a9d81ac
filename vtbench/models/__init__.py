"""timm backbones, their weights (hub / checkpoint / package / random), eval transforms and token taps.

Public API::

    create_backbone(name, weights="pretrained", model_kwargs=None, seed=0, device="cpu") -> Backbone
    Backbone.features(x, norm=True, kinds=None) -> {(kind, block): (B, D) tensor}
    build_transform(data_config, mode="model"|"ipvit", ...) -> (transform, description)
    describe_model(name, model_kwargs=None) -> dict
    find_models(pattern=None, pretrained=False) -> list[str]

Definitions (tokens, norm, weights sha256, transforms): docs/models.md.
"""

from vtbench.models.backbone import Backbone, create_backbone
from vtbench.models.catalog import describe_model, find_models
from vtbench.models.transforms import build_transform
from vtbench.models.weights import lukemelas_to_timm

__all__ = ["Backbone", "create_backbone", "build_transform", "describe_model", "find_models", "lukemelas_to_timm"]
