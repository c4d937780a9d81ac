"""Eval transforms: timm's own (``model``) or the paper's resize-without-crop (``ipvit``)."""

from __future__ import annotations

from typing import Callable

from vtbench.errors import VTError

MODES = ("model", "ipvit")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash", "border")
# The paper's code resizes with torchvision's Resize((224, 224)), whose default is bilinear.
IPVIT_INTERPOLATION = "bilinear"


class ImageTransform:
    """PIL image -> float tensor (3, H, W): convert to RGB, then run a torchvision pipeline. Picklable.

    :meth:`to_array` gives the same values as a (H, W, 3) float32 array, which batches stack into
    channels_last memory directly. When the pipeline ends in ToTensor + Normalize (timm's eval
    transform and ``ipvit`` do), it runs the PIL steps and then looks every pixel up in a table of
    the 256 possible values per channel, computed with the very float32 operations ToTensor and
    Normalize apply: bit-identical, and 3x cheaper than the tensor steps.
    """

    def __init__(self, pipeline: Callable, description: dict):
        self.pipeline = pipeline
        self.description = description
        self._pil_steps, self._table = _split_pipeline(pipeline)

    def __call__(self, image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return self.pipeline(image)

    def to_array(self, image, out=None):
        """The transformed image as a (H, W, 3) float32 array, written into ``out`` when given."""
        import numpy as np

        if self._table is None:
            values = self(image).permute(1, 2, 0).numpy()
            if out is None:
                return values
            out[...] = values
            return out
        if image.mode != "RGB":
            image = image.convert("RGB")
        for step in self._pil_steps:
            image = step(image)
        pixels = np.asarray(image)
        if out is None:
            out = np.empty(pixels.shape, dtype=np.float32)
        for channel in range(pixels.shape[2]):
            np.take(self._table[channel], pixels[..., channel], out=out[..., channel])
        return out

    def __repr__(self) -> str:
        return f"ImageTransform({self.description})"


def _split_pipeline(pipeline):
    """``(PIL steps, (3, 256) float32 table)`` when ``pipeline`` is a Compose ending in ToTensor + Normalize
    (in float32, 3 channels); ``(None, None)`` otherwise."""
    import numpy as np
    import torch
    from torchvision import transforms as T

    steps = getattr(pipeline, "transforms", None)
    if not steps or len(steps) < 2:
        return None, None
    to_tensor, normalize = steps[-2], steps[-1]
    # timm's MaybeToTensor is ToTensor for PIL images
    if type(to_tensor).__name__ not in ("ToTensor", "MaybeToTensor") or not isinstance(normalize, T.Normalize):
        return None, None
    if torch.get_default_dtype() != torch.float32:  # ToTensor converts to the default dtype
        return None, None
    mean = torch.as_tensor(normalize.mean, dtype=torch.float32).reshape(-1)
    std = torch.as_tensor(normalize.std, dtype=torch.float32).reshape(-1)
    if len(mean) != 3 or len(std) != 3:
        return None, None
    # ToTensor: uint8 -> float32, / 255; Normalize: - mean, / std (float32, per channel): the same ops.
    scaled = torch.arange(256, dtype=torch.float32).div(255)
    table = (scaled[None, :] - mean[:, None]) / std[:, None]
    return list(steps[:-2]), np.ascontiguousarray(table.numpy())


def _input_size(value, channels: int) -> tuple[int, int, int]:
    if isinstance(value, int):
        size = (channels, value, value)
    else:
        size = tuple(value)
        if len(size) == 2:
            size = (channels, *size)
    if len(size) != 3 or not all(isinstance(v, int) and v > 0 for v in size):
        raise VTError(f"input size must be a positive integer or (C, H, W); got {value!r}")
    return size


def _triple(name: str, value, channels: int, positive: bool) -> list[float]:
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError):
        raise VTError(f"{name} must be {channels} numbers; got {value!r}") from None
    if len(values) != channels or (positive and min(values) <= 0):
        raise VTError(f"{name} must be {channels} {'positive ' if positive else ''}numbers; got {value!r}")
    return values


def check_transform_mode(mode: str) -> None:
    """VTError unless ``mode`` is one of :data:`MODES`."""
    if mode not in MODES:
        raise VTError(f"unknown transform mode '{mode}'; use one of: {', '.join(MODES)}")


def build_transform(
    data_config: dict,
    mode: str = "model",
    *,
    input_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    mean=None,
    std=None,
) -> tuple[Callable, dict]:
    """``(transform, description)`` for eval images.

    ``mode="model"``: timm's eval transform from ``data_config`` (resize to input/crop_pct,
    crop, normalise), each given option overriding the config. ``mode="ipvit"``: resize to the
    input size with no crop (the paper's protocol), bilinear unless ``interpolation`` is given,
    normalised with the config's mean/std unless given. ``description`` is JSON-serialisable and
    identifies the transform in cache metadata.
    """
    check_transform_mode(mode)
    size = _input_size(data_config["input_size"] if input_size is None else input_size, data_config["input_size"][0])
    default_interpolation = IPVIT_INTERPOLATION if mode == "ipvit" else data_config.get("interpolation", "bicubic")
    interpolation = interpolation or default_interpolation
    if interpolation not in INTERPOLATIONS:
        raise VTError(f"unknown interpolation '{interpolation}'; use one of: {', '.join(INTERPOLATIONS)}")
    mean = _triple("mean", data_config["mean"] if mean is None else mean, size[0], positive=False)
    std = _triple("std", data_config["std"] if std is None else std, size[0], positive=True)

    if mode == "ipvit":
        if crop_pct is not None:
            raise VTError("the ipvit transform resizes without cropping; crop_pct applies to the 'model' transform only")
        from torchvision import transforms as T

        pipeline = T.Compose(
            [
                T.Resize(size[1:], interpolation=T.InterpolationMode(interpolation)),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )
        crop_mode = None
    else:
        from timm.data import DEFAULT_CROP_PCT, create_transform

        if crop_pct is None:
            crop_pct = data_config.get("crop_pct") or DEFAULT_CROP_PCT
        if not 0 < crop_pct <= 1:
            raise VTError(f"crop_pct must be in (0, 1]; got {crop_pct}")
        crop_mode = data_config.get("crop_mode") or "center"
        if crop_mode not in CROP_MODES:
            raise VTError(f"unknown crop_mode '{crop_mode}'; use one of: {', '.join(CROP_MODES)}")

        pipeline = create_transform(
            input_size=size,
            is_training=False,
            interpolation=interpolation,
            mean=tuple(mean),
            std=tuple(std),
            crop_pct=crop_pct,
            crop_mode=crop_mode,
        )
    description = {
        "mode": mode,
        "input_size": list(size),
        "interpolation": interpolation,
        "crop_pct": None if crop_pct is None else float(crop_pct),
        "crop_mode": crop_mode,
        "mean": mean,
        "std": std,
    }
    return ImageTransform(pipeline, description), description
