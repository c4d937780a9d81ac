"""Backbones: features against an independent hooked forward, weight sources and their sha256."""

from __future__ import annotations

import pytest
import torch

from vtbench.errors import VTError
from vtbench.models import create_backbone

# (name, model_kwargs, prefix tokens the model must have, has a class token)
VIT_CASES = [
    ("test_vit", dict(img_size=32), 1, True),
    ("deit_tiny_distilled_patch16_224", dict(img_size=32, depth=3), 2, True),  # cls + dist
    ("vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=2), 5, True),  # cls + 4 registers
    ("test_vit2", dict(img_size=32), 1, False),  # 1 register, no cls, avg pool with fc_norm
]
CNN_CASES = [("test_resnet", {}), ("test_efficientnet", {})]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread, and far faster than on two when the machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(backbone, batch=2):
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *backbone.data_config["input_size"], generator=generator)


def _capture(modules):
    """Forward hooks that record each module's output (or, for ('in', m), its input) in call order."""
    seen, handles = [], []
    for module in modules:
        if isinstance(module, tuple):
            handles.append(module[1].register_forward_pre_hook(lambda m, args: seen.append(args[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, args, out: seen.append(out)))
    return seen, handles


def _vit_reference(model, x, norm: bool, num_prefix: int) -> dict:
    """Per-block cls / patch mean / prelogits from hooks on model.blocks[i] and the classifier inputs."""
    heads = [("in", model.head)] + ([("in", model.head_dist)] if hasattr(model, "head_dist") else [])
    seen, handles = _capture(list(model.blocks) + heads)
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    blocks, head_inputs = seen[: len(model.blocks)], seen[len(model.blocks) :]
    fc_norm = model.fc_norm if norm and not isinstance(model.fc_norm, torch.nn.Identity) else (lambda v: v)
    ref = {}
    with torch.no_grad():
        for i, tokens in enumerate(blocks):
            tokens = model.norm(tokens) if norm else tokens
            if model.has_class_token:
                ref[("cls", i)] = fc_norm(tokens[:, 0])
            ref[("patch", i)] = fc_norm(tokens[:, num_prefix:].mean(dim=1))
    ref[("prelogits", 0)] = sum(head_inputs) / len(head_inputs)  # distilled DeiT averages cls and dist heads
    return ref


@pytest.mark.parametrize("name,kwargs,num_prefix,has_cls", VIT_CASES, ids=[c[0] for c in VIT_CASES])
def test_vit_features_match_hooked_forward(name, kwargs, num_prefix, has_cls):
    backbone = create_backbone(name, "random", model_kwargs=kwargs)
    assert backbone.arch == "vit"
    assert backbone.num_prefix_tokens == num_prefix
    assert ("cls" in backbone.layout) == has_cls
    depth = len(backbone.model.blocks)
    x = _images(backbone)
    for norm in (True, False):
        feats = backbone.features(x, norm=norm)
        ref = _vit_reference(backbone.model, x, norm, num_prefix)
        assert set(feats) == set(ref)
        assert len([k for k in feats if k[0] == "patch"]) == depth
        for key, value in ref.items():
            assert feats[key].dtype == torch.float32
            assert feats[key].shape == (x.shape[0], backbone.layout[key[0]][key[1]])
            torch.testing.assert_close(feats[key], value, rtol=1e-5, atol=1e-5, msg=f"{name} norm={norm} {key}")
    # The patch mean really excludes the prefix tokens: including them gives a different vector.
    seen, handles = _capture([backbone.model.blocks[-1]])
    with torch.no_grad():
        backbone.model(x)
    handles[0].remove()
    with_prefix = backbone.model.norm(seen[0]).mean(dim=1)
    assert not torch.allclose(backbone.features(x, norm=True, kinds=["patch"])[("patch", depth - 1)], with_prefix, atol=1e-4)


def test_norm_flag_changes_tokens():
    backbone = create_backbone("test_vit", "random", model_kwargs=dict(img_size=32))
    x = _images(backbone)
    normed, raw = backbone.features(x, norm=True), backbone.features(x, norm=False)
    last = len(backbone.layout["cls"]) - 1
    assert not torch.allclose(normed[("cls", last)], raw[("cls", last)], atol=1e-3)
    # prelogits are the model's own pre-logit feature whatever `norm` says; for a token-pool ViT
    # that is the normed last-block CLS.
    torch.testing.assert_close(normed[("prelogits", 0)], raw[("prelogits", 0)])
    torch.testing.assert_close(normed[("prelogits", 0)], normed[("cls", last)])


def test_fc_norm_vit_last_patch_mean_is_prelogits():
    # Avg-pool ViTs normalise after pooling; with norm=True the last block's patch mean is exactly what the head sees.
    backbone = create_backbone("test_vit2", "random", model_kwargs=dict(img_size=32))
    x = _images(backbone)
    feats = backbone.features(x, norm=True)
    last = len(backbone.layout["patch"]) - 1
    torch.testing.assert_close(feats[("patch", last)], feats[("prelogits", 0)])


@pytest.mark.parametrize("name,kwargs", CNN_CASES, ids=[c[0] for c in CNN_CASES])
def test_cnn_stage_features_match_hooked_forward(name, kwargs):
    backbone = create_backbone(name, "random", model_kwargs=kwargs)
    model = backbone.model
    assert backbone.arch == "cnn" and backbone.num_prefix_tokens == 0
    stages = [model.get_submodule(info["module"]) for info in model.feature_info]
    seen, handles = _capture(stages + [model.global_pool])
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    ref = {("stage", i): fmap.mean(dim=(2, 3)) for i, fmap in enumerate(seen[: len(stages)])}
    ref[("prelogits", 0)] = seen[-1]
    for norm in (True, False):
        feats = backbone.features(x, norm=norm)
        assert set(feats) == set(ref)
        for key, value in ref.items():
            assert feats[key].shape == (2, backbone.layout[key[0]][key[1]])
            torch.testing.assert_close(feats[key], value, rtol=1e-5, atol=1e-5, msg=f"{name} {key}")


def test_kinds_select_and_prelogits_only_path_agrees():
    backbone = create_backbone("deit_tiny_distilled_patch16_224", "random", model_kwargs=dict(img_size=32, depth=3))
    x = _images(backbone)
    full = backbone.features(x)
    cls_only = backbone.features(x, kinds=["cls"])
    assert list(cls_only) == [("cls", b) for b in range(3)]
    for key, value in cls_only.items():
        torch.testing.assert_close(value, full[key])
    cheap = backbone.features(x, kinds={"prelogits"})
    assert list(cheap) == [("prelogits", 0)]
    torch.testing.assert_close(cheap[("prelogits", 0)], full[("prelogits", 0)], rtol=1e-5, atol=1e-5)
    with pytest.raises(VTError, match="stage"):
        backbone.features(x, kinds=["stage"])


def test_backbone_is_frozen_and_features_carry_no_grad():
    backbone = create_backbone("test_resnet", "random")
    assert not backbone.model.training
    assert not any(p.requires_grad for p in backbone.model.parameters())
    feats = backbone.features(torch.randn(1, 3, 64, 64))
    assert all(not v.requires_grad for v in feats.values())
    assert backbone.layout == {"stage": [32, 32, 48, 192, 96], "prelogits": [96]}
