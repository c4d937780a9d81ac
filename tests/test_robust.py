"""vt robust: accuracy under perturbation, feature stability and CKA, checked against direct computations."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import make_imagefolder
from vtbench.cache import write_cache
from vtbench.errors import VTError
from vtbench.extract import extract
from vtbench.report.leaderboard import build_leaderboard
from vtbench.results import load
from vtbench.robust import linear_cka, run_accuracy, run_cka, run_stability
from vtbench.robust.cka import CKAAccumulator
from vtbench.transfer import run_probe

VIT = "vit_small_patch16_224"
VIT_KW = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}


def test_cka_reproduces_kornbliths_reference_values():
    np.random.seed(1337)
    X = np.random.randn(100, 10)
    Y = X + np.random.randn(100, 10)
    for chunk in (None, 7, 64):  # streamed in any chunking, the same numbers
        assert round(linear_cka(X, Y, chunk=chunk), 5) == 0.55761
        assert round(linear_cka(X, Y, debiased=True, chunk=chunk), 5) == 0.51346
    assert linear_cka(X, 3 * X + 1) == pytest.approx(1.0)  # invariant to scale and offset


def test_cka_matrix_from_a_cache_matches_the_in_memory_estimator(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 12))
    blocks = [base @ rng.standard_normal((12, 12)) * (b + 1) + rng.standard_normal((300, 12)) * b for b in range(4)]
    meta = {"format_version": 1, "model": "toy", "model_kwargs": {}, "weights_sha256": "ab" * 32, "weights_source": "x",
            "transform": {"mode": "model"}, "norm": True, "dtype": "float32", "dataset": "dtd:1", "split": "test",
            "data_fingerprint": "f", "token_kinds": ["cls"], "precision": "fp32", "timm_version": "t", "torch_version": "t"}
    write_cache(tmp_path / "c", meta, {("cls", b): x.astype(np.float32) for b, x in enumerate(blocks)},
                np.arange(300) % 3, [str(i) for i in range(300)], ["a", "b", "c"])
    (rec,) = run_cka("toy", "dtd", cache_dir=tmp_path / "c", results_dir=tmp_path / "r")
    stored = [b.astype(np.float32).astype(np.float64) for b in blocks]
    for p in range(4):
        for q in range(4):
            assert rec["cka"]["biased"][p][q] == pytest.approx(linear_cka(stored[p], stored[q]), abs=1e-9)
            assert rec["cka"]["debiased"][p][q] == pytest.approx(linear_cka(stored[p], stored[q], True), abs=1e-9)
    acc = CKAAccumulator([12, 12])
    acc.add([stored[0][:150], stored[1][:150]])
    acc.add([stored[0][150:], stored[1][150:]])
    assert acc.cka(0, 1) == pytest.approx(rec["cka"]["biased"][0][1], abs=1e-12)


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    folder = f"imagefolder:{make_imagefolder(root / 'imgs', classes=3, per_class=8, size=(32, 32))}"
    extract(VIT, folder, ["train", "test"], weights="random", model_kwargs=VIT_KW, progress=False, batch_size=8,
            workers=0, cache_dir=root / "c",
            perturb=["patchdrop:random:0.25:trials=2", "patchdrop:random:0.75", "shuffle:2", "lesion:attn:1"])
    return root, folder


def test_accuracy_fits_once_on_clean_and_scores_every_perturbed_test_set(perturbed, tmp_path):
    root, folder = perturbed
    kw = dict(cache_dir=root / "c", results_dir=tmp_path / "r")
    records = run_accuracy(VIT, folder, "cls[-1]", ["default", "knn"], **kw)
    by = {(r["protocol"], (r.get("perturbation") or {}).get("kind", "clean"),
           (r.get("perturbation") or {}).get("ratio")): r for r in records}
    assert len(records) == 2 * 5
    for proto in ("default", "knn"):
        (probe,) = run_probe(VIT, folder, "cls[-1]", proto, results_dir=tmp_path / "p", cache_dir=root / "c")
        clean = by[(proto, "clean", None)]
        assert clean["metrics"]["top1"] == pytest.approx(probe["metrics"]["top1"])  # the probe's own number
        assert clean["metrics"]["relative"] == 1.0
        two = by[(proto, "patchdrop", 0.25)]["metrics"]
        assert len(two["top1_trials"]) == 2 and two["top1"] == pytest.approx(np.mean(two["top1_trials"]))
        assert two["relative"] == pytest.approx(two["top1"] / clean["metrics"]["top1"])
        # scoring the perturbed test cache with vt probe --perturb trains on perturbed train features: another number
        assert by[(proto, "patchdrop", 0.75)]["caches"]["train"][0]["key"] == clean["caches"]["train"][0]["key"]
    lesion = run_accuracy(VIT, folder, "cls[-1]", "ncc", kinds=["lesion"], **kw)
    assert [(r.get("perturbation") or {}).get("kind", "clean") for r in lesion] == ["clean", "lesion"]
    board = build_leaderboard(load(tmp_path / "r"))
    (section,) = [s for s in board.sections if s.task == "robust"]
    assert section.show_perturbation and len(section.rows) == 2 * 5 + 2
    with pytest.raises(VTError, match="vt extract .* --perturb tokendrop"):
        run_accuracy(VIT, folder, "cls[-1]", perturb=["tokendrop:0.5:block=1"], **kw)


def test_scoring_the_clean_test_set_as_a_perturbation_gives_the_clean_number(perturbed, tmp_path):
    """The perturbed path uses the very probe fitted on clean features: a shuffle of one piece is the clean image."""
    root, folder = perturbed
    extract(VIT, folder, ["test"], weights="random", model_kwargs=VIT_KW, progress=False, batch_size=8, workers=0,
            cache_dir=root / "c", perturb=["shuffle:1"])
    records = run_accuracy(VIT, folder, "cls[-1]", "default", perturb=["shuffle:1"], cache_dir=root / "c",
                           results_dir=tmp_path / "r")
    clean, same = records
    assert same["perturbation"]["grid"] == 1 and same["metrics"]["top1"] == clean["metrics"]["top1"]


def test_stability_is_one_for_an_identity_perturbation_and_lower_for_drops(perturbed, tmp_path):
    root, folder = perturbed
    records = run_stability(VIT, folder, perturb=["shuffle:1", "patchdrop:random:0.75"], cache_dir=root / "c",
                            results_dir=tmp_path / "r")
    by = {(r["perturbation"]["kind"], r["tokens"]): r for r in records}
    assert by[("shuffle", "cls")]["per_block"]["pearson"] == pytest.approx([1.0] * 3)
    dropped = by[("patchdrop", "patch")]["per_block"]["pearson"]
    assert len(dropped) == 3 and all(v < 0.999 for v in dropped)


def test_imagenet_class_mapping_follows_timms_order(tmp_path):
    from vtbench.data import get_dataset
    from vtbench.data.imagenet import imagenet_class_index, imagenet_synsets

    synsets = imagenet_synsets()
    assert len(synsets) == 1000 and synsets[:2] == ["n01440764", "n01443537"] and synsets == sorted(synsets)
    root = tmp_path / "ds" / "val"
    make_imagefolder(tmp_path / "src", classes=1, per_class=1, splits=("x",))
    for synset in ("n02690373", "n01440764"):  # airliner (404), tench (0)
        (root / synset).mkdir(parents=True)
        (root / synset / "a.png").write_bytes((tmp_path / "src" / "x" / "class0" / "img000.png").read_bytes())
    ds = get_dataset(f"imagefolder:{tmp_path / 'ds'}", "val")
    assert list(imagenet_class_index(ds.class_names)) == [synsets.index(n) for n in ds.class_names] == [0, 404]
    with pytest.raises(VTError, match="not ImageNet-1k synset ids"):
        imagenet_class_index(["n01440764", "tench"])


CALTECH_SYNSETS = {"accordion": "n02672831", "airplanes": "n02690373", "Leopards": "n02128385", "barrel": "n02795169",
                   "binocular": "n02841315", "cannon": "n02950826", "cellphone": "n02992529", "ant": "n02219486"}


def test_lite0s_own_head_on_shared_images_with_imagenet_classes(tmp_path, lite0_weights, shared_data):
    """The head path on real weights: shared Caltech-101 images of classes ImageNet also has, in synset folders."""
    root = tmp_path / "imagenet-like"
    for caltech, synset in CALTECH_SYNSETS.items():
        (root / "test" / synset).mkdir(parents=True)
        for path in sorted((shared_data / "caltech101" / "test" / caltech).glob("*.jpg"))[:6]:
            (root / "test" / synset / path.name).symlink_to(path)
    spec = f"imagefolder:{root}"
    extract("tf_efficientnet_lite0", spec, ["test"], weights=str(lite0_weights), logits=True, kinds=["prelogits"],
            perturb=["patchdrop:random:0.75"], progress=False, cache_dir=tmp_path / "c")
    kw = dict(cache_dir=tmp_path / "c", results_dir=tmp_path / "r")
    (head,) = run_probe("tf_efficientnet_lite0", spec, "logits", "head", **kw)
    assert head["n"]["test"] == 48 and head["metrics"]["top5"] > 50  # chance: 0.5%
    clean, dropped = run_accuracy("tf_efficientnet_lite0", spec, "logits", "head", **kw)
    assert clean["metrics"]["top1"] == head["metrics"]["top1"]
    assert dropped["metrics"]["top1"] < clean["metrics"]["top1"]
    with pytest.raises(VTError, match="--tokens logits"):
        run_probe("tf_efficientnet_lite0", spec, "prelogits", "head", **kw)


def test_robustness_plots_draw_what_the_records_hold(perturbed, tmp_path):
    from vtbench.report.plots import plot_cka, plot_lesions, plot_robustness, plot_stability

    root, folder = perturbed
    kw = dict(cache_dir=root / "c", results_dir=tmp_path / "r")
    run_accuracy(VIT, folder, "cls[-1]", "ncc", **kw)
    run_stability(VIT, folder, **kw)
    run_cka(VIT, folder, kinds=["cls"], **kw)
    table = load(tmp_path / "r")
    fig = plot_robustness(table, folder, tmp_path / "robust.png")
    drop_ax, shuffle_ax = fig.axes
    (line,) = [ln for ln in drop_ax.get_lines() if not ln.get_label().startswith("_")]  # (error-bar caps aside)
    assert list(line.get_xdata()) == [0, 0.25, 0.75]  # clean at 0, then the ratios
    assert line.get_ydata()[0] == next(r["metrics"]["top1"] for r in table if r["task"] == "robust"
                                       and not r.get("perturbation"))
    assert list(shuffle_ax.get_lines()[0].get_xdata())[-1] == 2 and shuffle_ax.get_lines()[0].get_xdata()[0] == 1
    (lesion,) = plot_lesions(table, folder, tmp_path / "lesions.png").axes[0].get_lines()
    assert list(lesion.get_xdata()) == [1]
    stability = plot_stability(table, folder, tmp_path / "stability.png").axes[0].get_lines()
    assert len(stability) == sum(r["task"] == "stability" for r in table)
    heat = plot_cka(table, folder, tmp_path / "cka.png").axes[0].images[0].get_array()
    (rec,) = [r for r in table if r["task"] == "cka"]
    assert np.allclose(heat, rec["cka"]["biased"])
    assert all((tmp_path / f"{n}.png").stat().st_size > 0 for n in ("robust", "lesions", "stability", "cka"))
