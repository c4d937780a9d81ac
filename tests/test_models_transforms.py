"""build_transform: timm's eval transform, the paper's resize-without-crop, overrides, pickling."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from vtbench.errors import VTError
from vtbench.models import build_transform, create_backbone

DEIT_CONFIG = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
    "crop_pct": 0.875,
    "crop_mode": "center",
}


def _photo(width=300, height=180, seed=0) -> Image.Image:
    """A non-square RGB image with a red band on its left edge and a blue band on its right edge."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    band = width // 10
    pixels[:, :band] = (255, 0, 0)
    pixels[:, -band:] = (0, 0, 255)
    return Image.fromarray(pixels)


def test_model_mode_is_timms_eval_transform():
    backbone = create_backbone("test_vit", "random")
    transform, desc = build_transform(backbone.data_config, "model")
    image = _photo()
    assert torch.equal(transform(image), create_transform(**backbone.data_config)(image))
    assert desc == {
        "mode": "model",
        "input_size": [3, 160, 160],
        "interpolation": "bicubic",
        "crop_pct": 0.95,
        "crop_mode": "center",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    }


def test_model_mode_overrides_apply():
    image = _photo()
    overrides = dict(input_size=64, crop_pct=1.0, interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    transform, desc = build_transform(DEIT_CONFIG, "model", **overrides)
    expected = create_transform(
        input_size=(3, 64, 64), interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3, crop_pct=1.0, crop_mode="center"
    )(image)
    assert torch.equal(transform(image), expected)
    assert desc["input_size"] == [3, 64, 64] and desc["crop_pct"] == 1.0 and desc["interpolation"] == "bilinear"
    assert desc["mean"] == [0.5] * 3 and desc["std"] == [0.25] * 3


def test_ipvit_mode_resizes_the_whole_image_without_crop():
    image = _photo(300, 180)
    transform, desc = build_transform(DEIT_CONFIG, "ipvit")
    out = transform(image)
    assert out.shape == (3, 224, 224)
    # A manual resize of the whole image (PIL bilinear, the paper's torchvision default) and normalisation.
    resized = np.asarray(image.resize((224, 224), Image.BILINEAR), dtype=np.float32) / 255.0
    manual = (torch.from_numpy(resized).permute(2, 0, 1) - torch.tensor(DEIT_CONFIG["mean"])[:, None, None]) / torch.tensor(
        DEIT_CONFIG["std"]
    )[:, None, None]
    torch.testing.assert_close(out, manual, rtol=0, atol=1e-5)
    # No crop: both coloured edge bands survive, while the model transform's centre crop cuts them off.
    red = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor(DEIT_CONFIG["mean"])) / torch.tensor(DEIT_CONFIG["std"])
    torch.testing.assert_close(out[:, 100, 0], red, rtol=0, atol=1e-5)
    cropped, _ = build_transform(DEIT_CONFIG, "model")
    assert not torch.allclose(cropped(image)[:, 100, 0], red, atol=0.1)
    assert desc == {
        "mode": "ipvit",
        "input_size": [3, 224, 224],
        "interpolation": "bilinear",
        "crop_pct": None,
        "crop_mode": None,
        "mean": list(DEIT_CONFIG["mean"]),
        "std": list(DEIT_CONFIG["std"]),
    }


def test_ipvit_mode_uses_the_model_input_size_and_overrides():
    config = resolve_data_config({}, model=create_backbone("test_vit", "random").model)
    transform, desc = build_transform(config, "ipvit", interpolation="bicubic", mean=(0, 0, 0), std=(1, 1, 1))
    out = transform(_photo())
    assert out.shape == (3, 160, 160) and desc["input_size"] == [3, 160, 160]
    assert 0.0 <= out.min() and out.max() <= 1.0  # mean 0, std 1: plain [0, 1] pixels
    assert desc["interpolation"] == "bicubic"


@pytest.mark.parametrize("mode", ["model", "ipvit"])
def test_transform_pickles_and_describes_itself_in_json(mode):
    transform, desc = build_transform(DEIT_CONFIG, mode)
    image = _photo()
    clone = pickle.loads(pickle.dumps(transform))
    assert torch.equal(clone(image), transform(image))
    assert json.loads(json.dumps(desc)) == desc


@pytest.mark.parametrize("mode,options", [("model", {}), ("ipvit", {}),
                                          ("model", {"interpolation": "bilinear", "mean": (0.1, 0.2, 0.3), "std": (0.7, 0.5, 0.3)})])
def test_to_array_is_bit_identical_to_the_tensor_pipeline(mode, options):
    transform, _ = build_transform(DEIT_CONFIG, mode, **options)
    assert transform._table is not None  # the lookup path, not the fallback
    for image in (_photo(seed=1), _photo(width=160, height=400, seed=2).convert("L"), _photo(seed=3).convert("RGBA")):
        expected = transform(image).permute(1, 2, 0).numpy()
        out = np.full(expected.shape, np.nan, dtype=np.float32)
        assert transform.to_array(image, out=out) is out
        assert np.array_equal(out, expected)  # bit for bit, not allclose
        assert np.array_equal(transform.to_array(image), expected)


def test_to_array_falls_back_to_the_pipeline_for_other_transforms():
    from vtbench.models.transforms import ImageTransform

    def pipeline(image):  # not a Compose ending in ToTensor + Normalize
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 7

    transform = ImageTransform(pipeline, {"mode": "custom"})
    image = _photo(width=20, height=10)
    assert transform._table is None
    assert np.array_equal(transform.to_array(image), np.asarray(image, dtype=np.float32) / 7)


def test_grayscale_images_become_three_channels():
    transform, _ = build_transform(DEIT_CONFIG, "ipvit")
    gray = _photo().convert("L")
    out = transform(gray)
    assert out.shape == (3, 224, 224)
    torch.testing.assert_close(out, transform(gray.convert("RGB")))


@pytest.mark.parametrize(
    "mode,options,message",
    [
        ("squash", {}, "unknown transform mode"),
        ("model", {"interpolation": "cubic"}, "unknown interpolation"),
        ("model", {"crop_pct": 1.5}, "crop_pct"),
        ("ipvit", {"crop_pct": 0.9}, "without cropping"),
        ("model", {"input_size": 0}, "input size"),
        ("model", {"mean": (0.5, 0.5)}, "mean"),
        ("ipvit", {"std": (0.5, 0.0, 0.5)}, "std"),
    ],
)
def test_bad_transform_options_are_vterrors(mode, options, message):
    with pytest.raises(VTError, match=message):
        build_transform(DEIT_CONFIG, mode, **options)
