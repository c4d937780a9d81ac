"""Perturbed extraction: PatchDrop, shuffle, lesions and token drop, each checked against what it must do."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
import torch

from tests.conftest import SHARED_DATA
from tests.helpers import make_imagefolder
from tests.test_extract import VT, read_all, run_vt
from vtbench.cache import find_cache, open_cache
from vtbench.errors import VTError
from vtbench.extract import extract
from vtbench.models import build_transform, create_backbone
from vtbench.perturb.apply import Perturber, black_value, salient_mask, shuffle_pieces
from vtbench.perturb.spec import parse, parse_all
from vtbench.settings import SettingsQuery

VIT = "vit_small_patch16_224"
VIT_KW = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}  # a 4 x 4 patch grid


@pytest.fixture(scope="module")
def vit():
    bb = create_backbone(VIT, "random", model_kwargs=VIT_KW)
    _, desc = build_transform(bb.data_config)
    return bb, desc


def _batch(desc, n=6, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *desc["input_size"][1:], generator=g)


def test_spec_grammar_and_errors():
    assert parse("patchdrop:random:0.5") == [{"kind": "patchdrop", "mode": "random", "ratio": 0.5, "seed": 0, "trial": 0}]
    assert [p["trial"] for p in parse("patchdrop:random:0.3:trials=3:seed=2")] == [0, 1, 2]
    assert parse("shuffle:4")[0]["grid"] == 4 and parse("lesion:attn:-1")[0] == {"kind": "lesion", "part": "attn",
                                                                                  "block": -1}
    assert parse("lesion:block:1.2")[0] == {"kind": "lesion", "part": "block", "stage": 1, "block": 2}
    assert parse("tokendrop:0.25:block=4")[0]["before_block"] == 4
    assert parse("patchdrop:salient:0.5")[0]["head"] == 1
    assert len(parse_all(["patchdrop:random:0.5", "patchdrop:random:0.5", "shuffle:2"])) == 2
    for bad, needle in [("blur:3", "unknown perturbation"), ("patchdrop:random:1.5", "in [0, 1]"),
                        ("patchdrop:random", "a mode"), ("shuffle:x", "integer"), ("lesion:attn:1.2", "removed whole"),
                        ("tokendrop:0.5", "block"), ("lesion:mlp:2:trials=2", "trials= only"),
                        ("patchdrop:random:0.5:size=3", "unknown option")]:
        with pytest.raises(VTError, match=re.escape(needle)):
            parse(bad)
    with pytest.raises(VTError, match="trial=T"):
        parse("patchdrop:random:0.5:trials=2", query=True)


def test_random_patchdrop_blacks_exactly_its_cells_per_image(vit):
    bb, desc = vit
    drop = Perturber(parse("patchdrop:random:0.3")[0], bb, desc)
    assert drop.resolved["grid"] == 4  # the ViT's own patch grid at its input size
    x, ids = _batch(desc), [f"img{i}" for i in range(6)]
    out, records = drop.input(x, ids)
    cells = records["dropped_cells"].astype(bool)
    assert cells.shape == (6, 16) and (cells.sum(1) == round(0.3 * 16)).all()
    black = black_value(desc)
    for b in range(6):
        for cell in range(16):
            r, c = divmod(cell, 4)
            patch, orig = out[b, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8], x[b, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8]
            if cells[b, cell]:
                assert torch.equal(patch, black.expand_as(patch)), (b, cell)  # black: 0 in [0, 1] pixel space
            else:
                assert torch.equal(patch, orig)
    # the same cells for an image whatever its batch and position; other seeds and trials draw others
    _, again = drop.input(x.flip(0)[:3], ids[::-1][:3])
    assert np.array_equal(again["dropped_cells"], records["dropped_cells"][::-1][:3])
    other = Perturber(parse("patchdrop:random:0.3:trial=1")[0], bb, desc).input(x, ids)[1]["dropped_cells"]
    assert not np.array_equal(other, records["dropped_cells"])
    cnn_grid = Perturber(parse("patchdrop:random:0.5")[0], create_backbone("resnet18", "random"),
                         {**desc, "input_size": [3, 224, 224]}).resolved["grid"]
    assert cnn_grid == 14  # the paper's 16 px squares for CNNs


def test_salient_and_nonsalient_partition_the_grid():
    rng = np.random.default_rng(0)
    attention = rng.random((5, 16)) ** 3
    attention[:, :3] = 0  # cells without attention
    for mass in (0.1, 0.5, 0.9):
        salient = salient_mask(attention, mass)
        nonsalient = ~salient
        assert not (salient & nonsalient).any() and (salient | nonsalient).all()
        share = (attention * salient).sum(1) / attention.sum(1)
        assert (share >= mass - 1e-12).all()  # the salient cells hold at least that mass ...
        smallest = np.where(salient, attention, np.inf).min(1)
        assert (share - smallest / attention.sum(1) < mass + 1e-12).all()  # ... and no cell more than needed
    assert np.array_equal(salient_mask(attention, 1.0), attention > 0)  # λ = 1: every cell that carries attention


def test_salient_patchdrop_uses_the_last_blocks_class_attention(vit):
    bb, desc = vit
    salient = Perturber(parse("patchdrop:salient:0.5")[0], bb, desc, saliency=bb)
    nonsalient = Perturber(parse("patchdrop:nonsalient:0.5")[0], bb, desc, saliency=bb)
    assert salient.resolved["saliency"]["weights_sha256"] == bb.weights_sha256 and salient.resolved["grid"] == 4
    x, ids = _batch(desc), [str(i) for i in range(6)]
    attention = salient.attention(x)
    assert attention.shape == (6, 16) and (attention >= 0).all() and (attention.sum(1) <= 1 + 1e-6).all()
    a = salient.input(x, ids, attention)[1]["dropped_cells"].astype(bool)
    b = nonsalient.input(x, ids, attention)[1]["dropped_cells"].astype(bool)
    assert np.array_equal(a, ~b)
    with pytest.raises(VTError, match="saliency"):
        Perturber(parse("patchdrop:salient:0.5")[0], create_backbone("resnet18", "random"), desc)


@pytest.mark.parametrize("grid", [1, 2, 4, 8])
def test_shuffle_permutes_pieces_and_grid_1_is_the_identity(grid, vit):
    bb, desc = vit
    shuffle = Perturber(parse(f"shuffle:{grid}")[0], bb, desc)
    x = _batch(desc, n=3)
    out, records = shuffle.input(x, ["a", "b", "c"])
    size = 32 // grid
    def pieces(t):
        return sorted(t[:, r * size:(r + 1) * size, c * size:(c + 1) * size].numpy().tobytes()
                      for r in range(grid) for c in range(grid))

    for b in range(3):
        assert pieces(out[b]) == pieces(x[b])  # the multiset of pieces is unchanged
        perm = records["permutation"][b]
        assert sorted(perm) == list(range(grid * grid))
        r, c = divmod(int(perm[0]), grid)
        assert torch.equal(out[b, :, :size, :size], x[b, :, r * size:(r + 1) * size, c * size:(c + 1) * size])
    if grid == 1:
        assert torch.equal(out, x)
    assert torch.equal(shuffle_pieces(x, np.tile(np.arange(grid * grid), (3, 1)), grid), x)
    with pytest.raises(VTError, match="equal pieces"):
        Perturber(parse("shuffle:3")[0], bb, desc)


def _hand_forward(model, x, skip_block=None, skip_part=None):
    """timm's ViT forward written out, with one block's branch (or the whole block) left out; cls token per block."""
    h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    out = []
    for i, blk in enumerate(model.blocks):
        if i != skip_block:
            h = blk(h)
        elif skip_part == "attn":
            h = h + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(h))))
        elif skip_part == "mlp":
            h = h + blk.drop_path1(blk.ls1(blk.attn(blk.norm1(h))))
        out.append(model.norm(h)[:, 0])
    return out


@pytest.mark.parametrize("part", ["block", "attn", "mlp"])
def test_lesion_matches_a_hand_written_forward_and_leaves_earlier_blocks(part, vit):
    bb, desc = vit
    x = _batch(desc, n=4)
    lesion = Perturber(parse(f"lesion:{part}:-2")[0], bb, desc)
    assert lesion.resolved["block"] == 1 and lesion.resolved["module"] == "blocks.1" + ("" if part == "block" else f".{part}")
    with lesion.model(["a"] * 4):
        feats = bb.features(x, kinds=["cls"])
    clean = bb.features(x, kinds=["cls"])
    with torch.inference_mode():
        hand = _hand_forward(bb.model, x, 1, part)
    for block in range(3):
        torch.testing.assert_close(feats[("cls", block)], hand[block].float(), rtol=1e-5, atol=1e-5)
    assert torch.equal(feats[("cls", 0)], clean[("cls", 0)])  # earlier blocks untouched
    assert not torch.allclose(feats[("cls", 2)], clean[("cls", 2)])
    assert torch.equal(bb.features(x, kinds=["cls"])[("cls", 2)], clean[("cls", 2)])  # restored afterwards


def test_cnn_lesion_skips_one_residual_block():
    bb = create_backbone("resnet18", "random")
    _, desc = build_transform(bb.data_config, input_size=64)
    x = torch.randn(2, 3, 64, 64)
    lesion = Perturber(parse("lesion:block:1.1")[0], bb, desc)
    assert lesion.resolved["module"] == "layer2.1"
    with lesion.model(["a", "b"]):
        feats = bb.features(x, kinds=["prelogits"])[("prelogits", 0)]
    m = bb.model
    with torch.inference_mode():
        h = m.maxpool(m.act1(m.bn1(m.conv1(x))))
        h = m.layer2[0](m.layer1(h))  # layer2.1 left out
        h = m.layer4(m.layer3(h))
        hand = m.forward_head(h, pre_logits=True)
    torch.testing.assert_close(feats, hand, rtol=1e-5, atol=1e-5)
    with pytest.raises(VTError, match="no identity shortcut"):
        Perturber(parse("lesion:block:1.0")[0], bb, desc)


def test_token_drop_zeroes_patch_tokens_before_the_block_and_keeps_the_class_token(vit):
    bb, desc = vit
    drop = Perturber(parse("tokendrop:0.5:block=1")[0], bb, desc)
    seen = {}
    hook = bb.model.blocks[1].register_forward_hook(lambda m, args, out: seen.__setitem__("x", args[0].clone()))
    x = _batch(desc, n=3)
    try:
        with drop.model(["a", "b", "c"]) as records:
            bb.features(x, kinds=["cls"])
    finally:
        hook.remove()
    dropped = records["dropped_tokens"].astype(bool)
    assert dropped.shape == (3, 16) and (dropped.sum(1) == 8).all()
    tokens = seen["x"]
    assert (tokens[:, 1:][torch.as_tensor(dropped)] == 0).all()
    assert (tokens[:, 1:][~torch.as_tensor(dropped)] != 0).any(-1).all() and (tokens[:, 0] != 0).any(-1).all()


def test_extract_writes_each_perturbation_beside_the_clean_cache(tmp_path):
    folder = f"imagefolder:{make_imagefolder(tmp_path / 'imgs', classes=3, per_class=4, size=(32, 32))}"
    kw = dict(weights="random", model_kwargs=VIT_KW, progress=False, batch_size=4, workers=0, cache_dir=tmp_path / "c")
    specs = ["patchdrop:random:0.5", "shuffle:2", "lesion:mlp:0", "tokendrop:0.25:block=2"]
    reports = extract(VIT, folder, "train", perturb=specs, **kw)
    assert len(reports) == 5 and len({r.path for r in reports}) == 5
    (clean_alone,) = extract(VIT, folder, "train", **kw)
    assert clean_alone.reused and clean_alone.path == reports[0].path  # the clean key did not change
    clean = open_cache(reports[0].path)
    assert "perturbation" not in clean.meta
    drop = open_cache(find_cache(VIT, folder, "train", tmp_path / "c", settings=SettingsQuery(perturb=specs[0])))
    assert drop.meta["perturbation"]["grid"] == 4
    cells = drop.perturbation_record("dropped_cells")
    assert cells.shape == (12, 16) and (cells.sum(1) == 8).all()
    assert not np.allclose(drop.block("cls", -1), clean.block("cls", -1))
    lesioned = open_cache(find_cache(VIT, folder, "train", tmp_path / "c", settings=SettingsQuery(perturb="lesion:mlp:-3")))
    assert lesioned.meta["perturbation"]["module"] == "blocks.0.mlp"
    # a rerun reuses every cache; a forced one recomputes the same bits
    again = extract(VIT, folder, "train", perturb=specs, **kw)
    assert all(r.reused for r in again)
    forced = extract(VIT, folder, "train", perturb=specs, force=True, **dict(kw, cache_dir=tmp_path / "d"))
    for a, b in zip(reports, forced):
        da, db = read_all(a.path), read_all(b.path)
        assert da.keys() == db.keys() and all(np.array_equal(da[k], db[k]) for k in da)


def test_kill_9_during_perturbed_extraction_then_rerun_is_identical(tmp_path, vt, monkeypatch):
    folder = f"imagefolder:{make_imagefolder(tmp_path / 'imgs', classes=4, per_class=24, splits=('train',), size=(64, 48))}"
    kw = '{"img_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2}'
    base = ["extract", "--model", VIT, "--dataset", folder, "--split", "train", "--random-init", "--model-kwargs", kw,
            "--batch-size", "4", "--no-progress", "--workers", "0", "--perturb", "patchdrop:random:0.4",
            "--perturb", "shuffle:4", "--perturb", "tokendrop:0.5:block=1"]
    env = dict(os.environ, VT_COMMIT_EVERY_S="0")
    proc = subprocess.Popen([VT, *base, "--out", str(tmp_path / "killed")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, done = time.time() + 120, 0
    while time.time() < deadline and proc.poll() is None and done < 40:
        for partial in (tmp_path / "killed").rglob("*.partial.h5"):
            try:
                with h5py.File(partial, "r", locking=False) as f:
                    done = max(done, int((f["row_status"][:] == 1).sum()))
            except OSError:
                pass
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make the dataset larger"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    res = run_vt(*base, "--out", str(tmp_path / "killed"), env=env)
    assert res.returncode == 0 and "resumed" in res.stdout, res.stderr
    monkeypatch.setenv("VT_COMMIT_EVERY_S", "0")
    assert vt(*base, "--out", tmp_path / "clean").returncode == 0
    killed = {p.name: p for p in (tmp_path / "killed").rglob("*.h5")}
    clean = {p.name: p for p in (tmp_path / "clean").rglob("*.h5")}
    assert killed.keys() == clean.keys() and len(killed) == 4
    for name in killed:
        da, db = read_all(killed[name]), read_all(clean[name])
        assert da.keys() == db.keys()
        for key in da:
            assert np.array_equal(da[key], db[key]), (name, key)


def test_real_vit_patchdrop_on_shared_dtd(tmp_path, vit_weights, vt):
    if not (SHARED_DATA / "dtd").is_dir():
        pytest.skip("../shared/data is not available")
    cache, results = tmp_path / "cache", tmp_path / "r"
    res = vt("extract", "-m", "vit_small_patch14_dinov2", "--checkpoint", vit_weights, "-d", "dtd", "--root",
             SHARED_DATA / "dtd", "--input-size", "56", "--perturb", "patchdrop:random:0.5", "--out", cache,
             "--no-progress")
    assert res.returncode == 0, res.stderr
    clean = open_cache(find_cache("vit_small_patch14_dinov2", "dtd", "test", cache))
    drop = open_cache(find_cache("vit_small_patch14_dinov2", "dtd", "test", cache,
                                 settings=SettingsQuery(perturb="patchdrop:random:0.5")))
    assert drop.meta["perturbation"]["grid"] == 4 and (drop.perturbation_record("dropped_cells").sum(1) == 8).all()
    a, b = clean.block("cls", -1), drop.block("cls", -1)
    corr = np.mean([np.corrcoef(u, v)[0, 1] for u, v in zip(a, b)])
    assert 0.2 < corr < 0.999  # changed, but not noise
    common = ["-m", "vit_small_patch14_dinov2", "-d", "dtd", "-t", "cls[-1]", "-p", "knn", "--cache-dir", cache,
              "--results", results]
    assert vt("probe", *common).returncode == 0
    assert vt("probe", *common, "--perturb", "patchdrop:random:0.5").returncode == 0
    from vtbench.results import load

    tops = {r["perturbation"]["kind"] if r.get("perturbation") else "clean": r["metrics"]["top1"] for r in load(results)}
    assert tops["clean"] > 30 and 100 / 47 < tops["patchdrop"] < tops["clean"], tops  # DTD: 47 classes


def test_suite_extracts_probes_and_reports_each_perturbation(tmp_path):
    from vtbench.report.leaderboard import build_leaderboard
    from vtbench.results import load
    from vtbench.suite import load_suite, plan, run_suite

    path = tmp_path / "suite.yaml"
    path.write_text(f"""
suite: perturbed
datasets: [digits]
results: {tmp_path / 'r'}
report_dir: {tmp_path / 'report'}
cache_dir: {tmp_path / 'c'}
models:
  - model: {VIT}
    random_init: true
    model_kwargs: {{img_size: 32, patch_size: 8, embed_dim: 32, depth: 3, num_heads: 2}}
    tokens: ["cls[-1]"]
    perturb: [patchdrop:random:0.5, "shuffle:2"]
probe:
  protocol: [knn]
leaderboard:
  plots: [bars]
""")
    suite = load_suite(path)
    steps = [s.what for s in plan(suite) if s.kind == "probe"]
    assert len(steps) == 3 and any("[patchdrop:random:0.5]" in s for s in steps) and any("[shuffle:2]" in s for s in steps)
    run_suite(suite, progress=False, log=lambda msg: None)
    assert all(s.done for s in plan(suite))
    records = load(tmp_path / "r").records
    assert sorted((r.get("perturbation") or {}).get("kind", "clean") for r in records) == ["clean", "patchdrop", "shuffle"]
    (section,) = build_leaderboard(load(tmp_path / "r")).sections
    assert section.show_perturbation and sorted(r.perturbation for r in section.rows) == [
        "", "patchdrop random 50% on 4x4", "shuffle 2x2"]
    bad = path.read_text().replace("shuffle:2", "shuffle:x")
    path.write_text(bad)
    with pytest.raises(VTError, match="perturb"):
        load_suite(path)
