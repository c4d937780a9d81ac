"""Frozen timm backbones and their per-block token taps.

:func:`create_backbone` builds a timm model with weights from one of the sources in
:mod:`vtbench.models.weights`, freezes it, and wraps it in a :class:`Backbone` whose
:meth:`Backbone.features` returns one pooled vector per ``(kind, block)``:

- ViTs (``arch="vit"``): ``cls`` (prefix token 0) and ``patch`` (mean of the patch tokens,
  every prefix token excluded) for every block, plus ``prelogits``.
- CNNs and other hierarchical models (``arch="cnn"``): ``stage`` (global average pool of each
  ``feature_info`` level) plus ``prelogits``.

See docs/models.md for the exact definitions, including what ``norm`` means.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, replace
from typing import Iterable

import torch

from vtbench.errors import VTError
from vtbench.models import weights as weight_sources

HEAD_KINDS = {"prelogits", "logits"}  # outputs of the head on the final features (one "block" each)


@dataclass
class Backbone:
    """A frozen timm model plus everything needed to identify and tap it."""

    name: str
    model: torch.nn.Module
    model_kwargs: dict
    weights_source: str
    weights_sha256: str
    data_config: dict
    arch: str
    num_prefix_tokens: int
    layout: dict[str, list[int]]

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def with_logits(self) -> "Backbone":
        """The same backbone with its classifier head's output as one more token kind, ``logits`` (VTError for a
        model without a head)."""
        classes = int(getattr(self.model, "num_classes", 0) or 0)
        if classes <= 0:
            raise VTError(f"{self.name} has no classifier head (num_classes 0), so it has no logits")
        return replace(self, layout={**self.layout, "logits": [classes]})

    def features(
        self, x: torch.Tensor, norm: bool = True, kinds: Iterable[str] | None = None
    ) -> dict[tuple[str, int], torch.Tensor]:
        """``{(kind, block): (B, D) float tensor}`` for a transformed batch ``x`` (B, 3, H, W) on the model's device.

        ``kinds`` restricts the output to some of ``layout``'s kinds (None: all). ``norm=True``
        applies the model's final normalisation to every block (the paper's definition). Asking
        only for ``prelogits`` runs the plain forward (no per-block outputs).
        """
        wanted = self._check_kinds(kinds)
        with torch.inference_mode():
            if wanted <= HEAD_KINDS:  # the plain forward: no per-block outputs
                final = self.model.forward_features(x)
                return {(kind, 0): self.model.forward_head(final, pre_logits=kind == "prelogits").float()
                        for kind in sorted(wanted)}
            if self.arch == "vit":
                out = self._token_features(x, norm, wanted)
            else:
                out = self._stage_features(x, norm, wanted)
        return {key: out[key] for key in self._keys(wanted)}

    def _check_kinds(self, kinds: Iterable[str] | None) -> set[str]:
        if kinds is None:
            return set(self.layout)
        wanted = {kinds} if isinstance(kinds, str) else set(kinds)
        unknown = sorted(wanted - set(self.layout))
        if unknown or not wanted:
            raise VTError(
                f"'{self.name}' has no {', '.join(unknown) or 'requested'} features; it has: {', '.join(self.layout)}"
            )
        return wanted

    def _keys(self, wanted: set[str]) -> list[tuple[str, int]]:
        return [(kind, block) for kind, dims in self.layout.items() if kind in wanted for block in range(len(dims))]

    def _check_block_count(self, kind: str, got: int) -> None:
        if got != len(self.layout[kind]):
            raise RuntimeError(f"{self.name}: forward_intermediates gave {got} {kind} outputs, layout says {len(self.layout[kind])}")

    def _token_features(self, x, norm: bool, wanted: set[str]) -> dict:
        model = self.model
        need_final = bool(wanted & HEAD_KINDS)
        result = model.forward_intermediates(
            x, return_prefix_tokens=True, output_fmt="NLC", norm=norm, intermediates_only=not need_final
        )
        final, per_block = result if need_final else (None, result)
        self._check_block_count("patch", len(per_block))
        # Avg-pool ViTs normalise after pooling (fc_norm, with model.norm an Identity): apply it to pooled vectors.
        pooled_norm = _fc_norm(model) if norm else None
        out = {}
        for block, item in enumerate(per_block):
            patch_tokens, prefix_tokens = item if isinstance(item, tuple) else (item, None)
            pooled = {}
            if "cls" in wanted:
                pooled["cls"] = prefix_tokens[:, 0]
            if "patch" in wanted:
                pooled["patch"] = patch_tokens.mean(dim=1)
            for kind, vector in pooled.items():
                out[(kind, block)] = (pooled_norm(vector) if pooled_norm is not None else vector).float()
        out.update(_head_outputs(model, final, wanted))
        return out

    def _stage_features(self, x, norm: bool, wanted: set[str]) -> dict:
        model = self.model
        need_final = bool(wanted & HEAD_KINDS)
        options = {"intermediates_only": not need_final}
        if "norm" in inspect.signature(model.forward_intermediates).parameters:
            options["norm"] = norm
        result = model.forward_intermediates(x, **options)
        final, per_stage = result if need_final else (None, result)
        self._check_block_count("stage", len(per_stage))
        out = {}
        if "stage" in wanted:
            for stage, fmap in enumerate(per_stage):
                out[("stage", stage)] = fmap.mean(dim=(2, 3)).float()
        out.update(_head_outputs(model, final, wanted))
        return out


def _head_outputs(model, final, wanted: set[str]) -> dict:
    """``prelogits`` and ``logits`` (the classifier head's output) of the final features, where wanted."""
    return {(kind, 0): model.forward_head(final, pre_logits=kind == "prelogits").float()
            for kind in sorted(wanted & HEAD_KINDS)}


def _fc_norm(model: torch.nn.Module) -> torch.nn.Module | None:
    fc_norm = getattr(model, "fc_norm", None)
    if fc_norm is None or isinstance(fc_norm, torch.nn.Identity):
        return None
    return fc_norm


# --------------------------------------------------------------------------- construction


def pretrained_tags(name: str) -> list[str]:
    """The pretrained tags timm knows for ``name``'s architecture (``fb_in1k``, ...)."""
    import timm

    arch = name.split(".", 1)[0]
    return [full.split(".", 1)[1] for full in timm.list_pretrained(f"{arch}.*") if "." in full]


def check_model_name(name: str) -> None:
    """VTError (with close names) unless ``name`` is a timm model, optionally ``arch.tag`` with a known tag."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean: {', '.join(close)}?" if close else "; list names with 'vt models PATTERN'"
        raise VTError(f"unknown timm model '{name}'{hint}")
    if "." in name:
        arch, tag = name.split(".", 1)
        tags = pretrained_tags(arch)
        if tag not in tags:
            raise VTError(f"timm has no pretrained tag '{tag}' for {arch}; its tags: {', '.join(tags) or 'none'}")


def instantiate(name: str, model_kwargs: dict, pretrained_path=None) -> torch.nn.Module:
    """``timm.create_model``, loading ``pretrained_path`` through timm's pretrained loader when given."""
    import timm

    try:
        if pretrained_path is not None:
            return timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": str(pretrained_path)}, **model_kwargs
            )
        return timm.create_model(name, pretrained=False, **model_kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        if not model_kwargs:
            raise
        raise VTError(f"model_kwargs {model_kwargs} do not fit timm model '{name}': {exc}") from None


def sized_model_kwargs(name: str, model_kwargs: dict, input_size: int | None) -> dict:
    """``model_kwargs`` with ``img_size=input_size`` where the model has a patch grid built for another
    size (ViTs: feeding it other-sized images would not change its grid), unless ``img_size`` is given."""
    if input_size is None or "img_size" in model_kwargs:
        return model_kwargs
    with torch.device("meta"):  # the architecture only: no memory, no init
        shape = instantiate(name, model_kwargs)
    img_size = getattr(getattr(shape, "patch_embed", None), "img_size", None)
    if img_size is None or tuple(img_size) == (input_size, input_size):
        return model_kwargs
    patch = tuple(getattr(shape.patch_embed, "patch_size", (1, 1)))
    if input_size < max(patch):
        raise VTError(f"{name} cannot be built for {input_size}x{input_size} inputs: its patches are "
                      f"{patch[0]}x{patch[1]} pixels")
    return {**model_kwargs, "img_size": input_size}


def inspect_architecture(model: torch.nn.Module, name: str) -> tuple[str, dict[str, int], dict[str, list[int]]]:
    """``(arch, prefix_tokens, layout)``: how ``model`` is tapped, its prefix tokens by type, and its layout."""
    tap = getattr(model, "forward_intermediates", None)
    if tap is None:
        raise VTError(
            f"timm model '{name}' has no forward_intermediates(), so its blocks cannot be tapped; "
            f"pick another model (ViT, DeiT, ResNet, EfficientNet, ConvNeXt, ...)"
        )
    dims = [int(info["num_chs"]) for info in model.feature_info]
    prelogits = [int(getattr(model, "head_hidden_size", None) or model.num_features)]
    if "return_prefix_tokens" not in inspect.signature(tap).parameters:
        return "cnn", {}, {"stage": dims, "prelogits": prelogits}
    has_cls = getattr(model, "has_class_token", None)
    if has_cls is None:
        has_cls = getattr(model, "cls_token", None) is not None
    prefix = {
        "cls": int(bool(has_cls)),
        "dist": int(getattr(model, "dist_token", None) is not None),
        "registers": int(getattr(model, "num_reg_tokens", 0) or 0),
    }
    other = int(getattr(model, "num_prefix_tokens", 0)) - sum(prefix.values())
    if other:
        prefix["other"] = other
    layout = {"cls": dims, "patch": dims, "prelogits": prelogits} if has_cls else {"patch": dims, "prelogits": prelogits}
    return "vit", prefix, layout


def resolve_data_config(model: torch.nn.Module, input_size: int | None = None) -> dict:
    """timm's data config for ``model``, with the input size the model was built for (e.g. ``img_size=32``),
    or ``input_size`` where given (a CNN takes any)."""
    from timm.data import resolve_data_config as timm_resolve

    config = timm_resolve({}, model=model)
    patch_embed = getattr(model, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    size = (input_size, input_size) if input_size is not None else img_size
    if size is not None and tuple(size) != tuple(config["input_size"][1:]):
        config = timm_resolve({"input_size": (config["input_size"][0], *size)}, model=model)
    return config


def create_backbone(
    name: str,
    weights: str = "pretrained",
    *,
    model_kwargs: dict | None = None,
    input_size: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log=None,
) -> Backbone:
    """Build a frozen timm backbone.

    ``weights``: ``"pretrained"`` (timm's hub weights; VTError if they cannot be had),
    ``"random"`` (init under ``torch.manual_seed(seed)``), a checkpoint path
    (.safetensors/.pth/.pt/.bin with timm or lukemelas EfficientNet keys), or
    ``pkg:NAME`` (see :mod:`vtbench.models.weights`). ``model_kwargs`` go to ``timm.create_model``.
    ``input_size`` builds a model with a patch grid (a ViT) for that size (timm's ``img_size``);
    a checkpoint made for another grid has its position embedding resampled (said through ``log``).
    """
    check_model_name(name)
    model_kwargs = sized_model_kwargs(name, dict(model_kwargs or {}), input_size)
    if weights == "pretrained":
        source, path = weight_sources.pretrained_file(name)
        model = instantiate(name, model_kwargs, pretrained_path=path)
        sha256 = weight_sources.sha256_file(path)
    elif weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = instantiate(name, model_kwargs)
        source = f"random-init:seed={seed}"
        sha256 = weight_sources.sha256_state_dict(model.state_dict())
    else:
        source, path = weight_sources.resolve_checkpoint(weights)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = instantiate(name, model_kwargs)
        weight_sources.load_checkpoint(model, name, path, log=log)
        sha256 = weight_sources.sha256_file(path)
    model.eval().requires_grad_(False).to(device)
    arch, prefix, layout = inspect_architecture(model, name)
    return Backbone(
        name=name,
        model=model,
        model_kwargs=model_kwargs,
        weights_source=source,
        weights_sha256=sha256,
        data_config=resolve_data_config(model, input_size),
        arch=arch,
        num_prefix_tokens=sum(prefix.values()),
        layout=layout,
    )
