"""Perturbations at extraction time: what is done to a batch of images or to the model, row by row.

A :class:`Perturber` is one perturbation resolved for one backbone and transform: its cache dict
(the grid, block index and saliency model filled in), the per-row records it stores (dropped
cells, permutations, dropped tokens), the perturbed input of a batch, and the model change a lesion
or token drop makes during the forward. Every random draw is seeded per image, from the spec's seed,
its trial and the image id, so that a row's perturbation does not depend on batch size, order or
resume.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import numpy as np
import torch

from vtbench.errors import VTError
from vtbench.perturb.spec import DEFAULT_HEAD

CNN_CELL_PX = 16  # the paper's 16 px squares (a 14 x 14 grid at 224 px)


def row_rng(image_id: str, seed: int, trial: int) -> np.random.Generator:
    """The generator of one image's draw: a function of the seed, the trial and the image id only."""
    digest = int.from_bytes(hashlib.sha256(str(image_id).encode()).digest()[:8], "little")
    return np.random.default_rng([seed, trial, digest])


def cell_bounds(size: int, cells: int) -> list[tuple[int, int]]:
    """``(start, stop)`` pixel rows (or columns) of each of ``cells`` cells across ``size`` pixels."""
    return [(i * size // cells, (i + 1) * size // cells) for i in range(cells)]


def black_value(transform_desc: dict) -> torch.Tensor:
    """A black pixel (0 in [0, 1]) after the transform's normalisation: -mean/std per channel (float32)."""
    mean = torch.tensor(transform_desc["mean"], dtype=torch.float32)
    std = torch.tensor(transform_desc["std"], dtype=torch.float32)
    return ((torch.zeros(3) - mean) / std).reshape(3, 1, 1)


def cell_of_pixel(size: int, cells: int) -> np.ndarray:
    """For each of ``size`` pixels, the index of the cell (of :func:`cell_bounds`) it lies in."""
    return np.repeat(np.arange(cells), [stop - start for start, stop in cell_bounds(size, cells)])


def drop_cells(x: torch.Tensor, dropped: np.ndarray, grid: tuple[int, int], black: torch.Tensor) -> torch.Tensor:
    """``x`` (B, 3, H, W) with the cells ``dropped`` (B, gh * gw bool) set to ``black``."""
    cells = np.asarray(dropped, dtype=bool).reshape(len(dropped), grid[0], grid[1])
    rows, cols = cell_of_pixel(x.shape[2], grid[0]), cell_of_pixel(x.shape[3], grid[1])
    pixels = torch.from_numpy(cells[:, rows[:, None], cols[None, :]]).to(x.device)  # (B, H, W)
    return torch.where(pixels[:, None], black.to(x.device, x.dtype)[None], x)


def shuffle_pieces(x: torch.Tensor, permutations: np.ndarray, grid: int) -> torch.Tensor:
    """``x`` cut into ``grid`` x ``grid`` equal pieces, piece ``i`` of the output being piece ``perm[i]``."""
    B, C, H, W = x.shape
    ph, pw = H // grid, W // grid
    pieces = x.reshape(B, C, grid, ph, grid, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, grid * grid, C, ph, pw)
    index = torch.as_tensor(np.asarray(permutations, dtype=np.int64), device=x.device)
    moved = torch.take_along_dim(pieces, index[:, :, None, None, None], dim=1)
    return moved.reshape(B, grid, grid, C, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def salient_mask(attention: np.ndarray, mass: float) -> np.ndarray:
    """Per row, the patches holding the top ``mass`` of the attention (IPViT's evaluate.py): sorted ascending,
    normalised to sum 1, cumulative sum > 1 - mass, un-sorted. ``attention`` is (B, P)."""
    order = np.argsort(attention, axis=1, kind="stable")
    ranked = np.take_along_axis(attention, order, axis=1)
    cumulative = np.cumsum(ranked / ranked.sum(axis=1, keepdims=True), axis=1)
    mask = np.zeros_like(attention, dtype=bool)
    np.put_along_axis(mask, order, cumulative > 1 - mass, axis=1)
    return mask


def cls_attention(backbone, x: torch.Tensor, head) -> np.ndarray:
    """The last block's attention of the class token over the patch tokens, (B, P) float64: one head, or the
    mean over heads (``head="mean"``)."""
    model = backbone.model
    attn = model.blocks[-1].attn
    seen = {}
    hook = attn.register_forward_pre_hook(lambda module, args: seen.__setitem__("x", args[0]))
    try:
        with torch.inference_mode():
            model.forward_features(x)
    finally:
        hook.remove()
    tokens = seen["x"]
    B, N, C = tokens.shape
    with torch.inference_mode():
        qkv = attn.qkv(tokens).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        weights = ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)[:, :, 0, backbone.num_prefix_tokens:]
    chosen = weights.mean(dim=1) if head == "mean" else weights[:, int(head)]
    return chosen.double().cpu().numpy()


class _Zero(torch.nn.Module):
    """A removed residual branch: adds nothing to the residual stream."""

    def forward(self, x, *args, **kwargs):
        return torch.zeros_like(x)


class Perturber:
    """One perturbation resolved for one backbone and transform (see the module docstring)."""

    def __init__(self, spec: dict, backbone, transform_desc: dict, saliency=None):
        self.spec = dict(spec)
        self.backbone = backbone
        self.transform_desc = transform_desc
        self.saliency = saliency  # a Backbone (salient / non-salient PatchDrop)
        self.kind = spec["kind"]
        self.resolved = self._resolve()

    # ---------------------------------------------------------------- what the cache records

    def _resolve(self) -> dict:
        out = dict(self.spec)
        size = tuple(self.transform_desc["input_size"][1:])
        if self.kind == "patchdrop" and self.spec["mode"] == "random":
            out["grid"] = self.spec.get("grid") or self._default_grid(size)
        elif self.kind == "patchdrop":
            sal = self.saliency
            if sal is None or sal.arch != "vit":
                raise VTError("salient / non-salient PatchDrop needs a ViT saliency model: pass --saliency-model NAME "
                              "--saliency-checkpoint FILE (or extract a ViT, which is its own saliency model)")
            out["grid"] = int(self._patch_grid(sal, size)[0])
            out["saliency"] = {"model": sal.name, "weights_sha256": sal.weights_sha256,
                               "weights_source": sal.weights_source}
        elif self.kind == "shuffle":
            g = self.spec["grid"]
            if size[0] % g or size[1] % g:
                raise VTError(f"shuffle:{g}: {size[0]}x{size[1]} inputs do not cut into {g}x{g} equal pieces; "
                              "pick a grid that divides the input size")
        elif self.kind in ("lesion", "tokendrop"):
            out.update(self._model_target())
        return out

    def _default_grid(self, size) -> int:
        if self.backbone.arch == "vit":
            grid = self._patch_grid(self.backbone, size)
            if grid[0] != grid[1]:
                raise VTError(f"{self.backbone.name}: a {grid[0]}x{grid[1]} patch grid; give patchdrop a grid=N")
            return int(grid[0])
        return max(1, round(size[0] / CNN_CELL_PX))

    @staticmethod
    def _patch_grid(backbone, size) -> tuple[int, int]:
        patch = getattr(backbone.model.patch_embed, "patch_size", None)
        return size[0] // patch[0], size[1] // patch[1]

    def _model_target(self) -> dict:
        model = self.backbone.model
        if self.kind == "tokendrop" or "stage" not in self.spec:
            if self.backbone.arch != "vit":
                raise VTError(f"{self.backbone.name}: {self.kind} of a block index needs a ViT; for CNNs, "
                              "lesion:block:STAGE.BLOCK removes one residual block")
            depth = len(model.blocks)
            key = "before_block" if self.kind == "tokendrop" else "block"
            index = self.spec[key]
            if not -depth <= index < depth:
                raise VTError(f"{self.kind}: block {index} is out of range for {self.backbone.name} ({depth} blocks)")
            index %= depth
            module = f"blocks.{index}" + ("" if self.kind == "tokendrop" or self.spec["part"] == "block"
                                          else f".{self.spec['part']}")
            return {key: index, "depth": depth, "module": module}
        stage, block = self.spec["stage"], self.spec["block"]
        container, name = self._cnn_block(stage, block)
        return {"module": name}

    def _cnn_block(self, stage: int, block: int):
        model = self.backbone.model
        if hasattr(model, "layer1"):  # ResNet-style: layer1..layer4
            stages = [getattr(model, f"layer{i}") for i in range(1, 5)]
            names = [f"layer{i}" for i in range(1, 5)]
        elif isinstance(getattr(model, "blocks", None), torch.nn.Sequential):  # EfficientNet-style
            stages = list(model.blocks)
            names = [f"blocks.{i}" for i in range(len(stages))]
        else:
            raise VTError(f"{self.backbone.name}: no residual stages vtbench knows how to lesion")
        if not -len(stages) <= stage < len(stages):
            raise VTError(f"lesion: stage {stage} is out of range ({len(stages)} stages)")
        stage %= len(stages)
        blocks = stages[stage]
        if not -len(blocks) <= block < len(blocks):
            raise VTError(f"lesion: block {block} is out of range for stage {stage} ({len(blocks)} blocks)")
        block %= len(blocks)
        target = blocks[block]
        has_skip = getattr(target, "has_skip", None)
        if has_skip is None:
            has_skip = getattr(target, "downsample", "none") is None
        if not has_skip:
            raise VTError(f"lesion: {names[stage]}.{block} changes the shape of its input (no identity shortcut), so it "
                          "cannot be removed; pick a block with a residual shortcut")
        return blocks, f"{names[stage]}.{block}"

    @property
    def records(self) -> dict[str, tuple[int, str]]:
        """Per-row arrays this perturbation stores: ``{name: (width, dtype)}``."""
        r = self.resolved
        if self.kind == "patchdrop":
            return {"dropped_cells": (r["grid"] * r["grid"], "uint8")}
        if self.kind == "shuffle":
            return {"permutation": (r["grid"] * r["grid"], "int16")}
        if self.kind == "tokendrop":
            return {"dropped_tokens": (self._num_patches(), "uint8")}
        return {}

    def _num_patches(self) -> int:
        size = tuple(self.transform_desc["input_size"][1:])
        gh, gw = self._patch_grid(self.backbone, size)
        return gh * gw

    # ---------------------------------------------------------------- applying it

    def _draws(self, image_ids, draw) -> np.ndarray:
        seed, trial = self.resolved.get("seed", 0), self.resolved.get("trial", 0)
        return np.stack([draw(row_rng(i, seed, trial)) for i in image_ids])

    def _chosen(self, image_ids, total: int, fraction: float) -> np.ndarray:
        k = int(round(fraction * total))

        def draw(rng):
            mask = np.zeros(total, dtype=bool)
            mask[rng.choice(total, size=k, replace=False)] = True
            return mask

        return self._draws(image_ids, draw)

    def input(self, x: torch.Tensor, image_ids: list[str], attention: np.ndarray | None = None):
        """``(perturbed batch, {record: (B, width) array})`` for a transformed batch ``x``."""
        r = self.resolved
        if self.kind == "patchdrop":
            cells = r["grid"] * r["grid"]
            if r["mode"] == "random":
                dropped = self._chosen(image_ids, cells, r["ratio"])
            else:
                salient = salient_mask(attention, r["mass"])
                dropped = salient if r["mode"] == "salient" else ~salient
            black = black_value(self.transform_desc).to(x.device)
            return drop_cells(x, dropped, (r["grid"], r["grid"]), black), {"dropped_cells": dropped.astype(np.uint8)}
        if self.kind == "shuffle":
            g = r["grid"]
            perms = self._draws(image_ids, lambda rng: rng.permutation(g * g))
            return shuffle_pieces(x, perms, g), {"permutation": perms.astype(np.int16)}
        return x, {}

    @contextlib.contextmanager
    def model(self, image_ids: list[str]) -> Iterator[dict]:
        """The backbone changed for one forward (lesion, token drop); yields the records of the batch."""
        r = self.resolved
        if self.kind == "lesion":
            with self._lesioned():
                yield {}
        elif self.kind == "tokendrop":
            dropped = self._chosen(image_ids, self._num_patches(), r["ratio"])
            with self._tokens_dropped(dropped):
                yield {"dropped_tokens": dropped.astype(np.uint8)}
        else:
            yield {}

    @contextlib.contextmanager
    def _lesioned(self):
        model, r = self.backbone.model, self.resolved
        if "stage" in r:
            container, _ = self._cnn_block(r["stage"], r["block"])
            index = r["block"] % len(container)
            owner, attr, replacement = container, index, torch.nn.Identity()
        elif r["part"] == "block":
            owner, attr, replacement = model.blocks, r["block"], torch.nn.Identity()
        else:
            owner, attr, replacement = model.blocks[r["block"]], r["part"], _Zero()
        original = owner[attr] if isinstance(attr, int) else getattr(owner, attr)
        _set(owner, attr, replacement)
        try:
            yield
        finally:
            _set(owner, attr, original)

    @contextlib.contextmanager
    def _tokens_dropped(self, dropped: np.ndarray):
        prefix = self.backbone.num_prefix_tokens
        keep = torch.as_tensor(~dropped)

        def zero_tokens(module, args):
            x = args[0].clone()
            x[:, prefix:] = x[:, prefix:] * keep.to(x.device, x.dtype)[:, :, None]
            return (x, *args[1:])

        hook = self.backbone.model.blocks[self.resolved["before_block"]].register_forward_pre_hook(zero_tokens)
        try:
            yield
        finally:
            hook.remove()

    @property
    def needs_attention(self) -> bool:
        return self.kind == "patchdrop" and self.resolved["mode"] != "random"

    def attention(self, x: torch.Tensor) -> np.ndarray:
        """The saliency model's class-token attention for a batch transformed for the extracted model."""
        sal = self.saliency
        mine, theirs = self.transform_desc, sal.data_config
        if (tuple(mine["mean"]), tuple(mine["std"])) != (tuple(theirs["mean"]), tuple(theirs["std"])):
            # The same pixels, normalised as the saliency model expects them.
            to = lambda v: torch.tensor(v, dtype=x.dtype, device=x.device).reshape(1, 3, 1, 1)  # noqa: E731
            x = (x * to(mine["std"]) + to(mine["mean"]) - to(theirs["mean"])) / to(theirs["std"])
        return cls_attention(sal, x.to(sal.device), self.resolved.get("head", DEFAULT_HEAD))


def _set(owner, attr, value) -> None:
    if isinstance(attr, int):
        owner[attr] = value
    else:
        setattr(owner, attr, value)
