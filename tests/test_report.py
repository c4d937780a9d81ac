"""vt leaderboard / vt plot: tables and figures from hand-made result records.

The golden file tests/golden/leaderboard.md is the exact markdown of ``write_records``;
regenerate it with ``VT_UPDATE_GOLDEN=1 pytest tests/test_report.py`` after an intended change.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest

from vtbench.cli import main
from vtbench.errors import VTError
from vtbench.report.leaderboard import Leaderboard, build_leaderboard, dataset_labels, leaderboard_from_dir
from vtbench.report.plots import plot_bars, plot_per_block
from vtbench.results import identity, load, save

GOLDEN = Path(__file__).parent / "golden" / "leaderboard.md"

DEIT = "deit_small_patch16_224"
DEIT_W = {"source": "hub:timm/deit_small_patch16_224.fb_in1k", "sha256": "1a2b3c4d5e6f" + "0" * 52}
RANDOM_W = {"source": "random", "sha256": "9f8e7d6c5b4a" + "1" * 52}
RN50 = "resnet50"
RN50_W = {"source": "hub:timm/resnet50.tv_in1k", "sha256": "abcdefabcdef" + "2" * 52}
CALTECH = "imagefolder:/data/caltech101"
PROBE_SPLITS = {"train": ["train", "val"], "test": ["test"]}
MODEL_TRANSFORM = {"mode": "model", "input_size": [3, 224, 224], "crop_pct": 0.875, "crop_mode": "center",
                   "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def record(**fields) -> dict:
    """A result record with fixed `created`/`versions`, so rendered output never changes."""
    rec = {
        "task": "probe",
        "protocol": "default",
        "variant": "",
        "seed": 0,
        "splits": PROBE_SPLITS,
        "caches": {},
        "transform": MODEL_TRANSFORM,
        "norm": True,
        "dtype": "float16",
        "precision": "fp32",
        "versions": {"vtbench": "0.1.0"},
        "created": "2026-01-01T00:00:00+0000",
    }
    rec.update(fields)
    return rec


def write_records(root: Path) -> None:
    """A small store: ensembles vs one token, a random-init row, ipvit, few-shot, per-block curves."""
    probe = {  # tokens -> (dtd:1, gtsrb, caltech101); '' = not run
        "cls[-1]": (66.1, 72.4, 88.0),
        "cls[-4:]": (72.6, 78.3, 90.5),
        "cls[-4:]+patch[-1]": (72.6, 77.0, ""),  # ties cls[-4:] on dtd
    }
    for tokens, values in probe.items():
        for dataset, top1 in zip(("dtd:1", "gtsrb", CALTECH), values):
            if top1 != "":
                save(root, record(model=DEIT, weights=DEIT_W, dataset=dataset, tokens=tokens,
                                  metrics={"top1": top1, "top5": top1 + 10}))
    save(root, record(model=DEIT, weights=RANDOM_W, dataset="dtd:1", tokens="cls[-1]", metrics={"top1": 12.3}))
    for dataset, last, best in (("dtd:1", 53.0, 54.1), ("gtsrb", 13.9, 14.3)):
        save(root, record(model=RN50, weights=RN50_W, dataset=dataset, tokens="prelogits", protocol="ipvit",
                          splits={"train": ["train", "val"], "test": ["test"]} if dataset == "dtd:1"
                          else {"train": ["train"], "test": ["test"]},
                          metrics={"top1": last, "top1_last_epoch": last, "top1_max_over_epochs": best}))
    for dataset, lr, ncc in (("dtd:1", (71.24, 0.81), (69.0, 0.9)), ("gtsrb", (80.0, 0.5), (82.5, 0.6))):
        for variant, (acc, ci) in (("lr", lr), ("ncc", ncc)):
            save(root, record(task="fewshot", model=DEIT, weights=DEIT_W, dataset=dataset, tokens="cls[-4:]",
                              protocol="fewshot-5w5s", variant=variant, splits={"test": ["test"]},
                              metrics={"accuracy": acc, "ci95": ci, "episodes": 600}))
    for block in range(12):
        for kind, top1 in (("cls", 30.0 + 3 * block), ("patch", 28.0 + 2 * block)):
            save(root, record(model=DEIT, weights=DEIT_W, dataset="dtd:1", tokens=f"{kind}[{block}]",
                              metrics={"top1": top1}))
    for stage in range(4):
        save(root, record(model=RN50, weights=RN50_W, dataset="dtd:1", tokens=f"stage[{stage}]",
                          metrics={"top1": 20.0 + 10 * stage}))


@pytest.fixture
def results(tmp_path) -> Path:
    root = tmp_path / "results"
    write_records(root)
    return root


def section(board: Leaderboard, task: str):
    (sec,) = [s for s in board.sections if s.task == task]
    return sec


def row(sec, tokens, protocol="default", weights=DEIT_W, variant=""):
    (r,) = [r for r in sec.rows if r.tokens == tokens and r.protocol == protocol
            and r.weights_sha256 == weights["sha256"] and r.variant == variant]
    return r


# --------------------------------------------------------------------------------------------
# Leaderboard


def test_markdown_matches_golden(results):
    text = leaderboard_from_dir(results).to_markdown()
    if os.environ.get("VT_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text, encoding="utf-8")
    assert text == GOLDEN.read_text(encoding="utf-8")


def test_cells_mean_and_ranks(results):
    board = build_leaderboard(load(results))
    probe = section(board, "probe")
    assert probe.datasets == [CALTECH, "dtd:1", "gtsrb"]
    assert probe.labels == {CALTECH: "caltech101", "dtd:1": "dtd", "gtsrb": "gtsrb"}
    # Per-block records are not rows unless asked for.
    assert {r.tokens for r in probe.rows} == {"cls[-1]", "cls[-4:]", "cls[-4:]+patch[-1]", "prelogits"}

    ens = row(probe, "cls[-4:]")
    assert ens.mean == pytest.approx((72.6 + 78.3 + 90.5) / 3)
    # dtd: 72.6 (tie of two rows) > 66.1 > 53.0 > 12.3 -> ranks 1.5, 1.5, 3, 4, 5
    assert ens.cells["dtd:1"].rank == 1.5
    assert row(probe, "cls[-4:]+patch[-1]").cells["dtd:1"].rank == 1.5
    assert row(probe, "cls[-1]").cells["dtd:1"].rank == 3
    assert row(probe, "prelogits", protocol="ipvit", weights=RN50_W).cells["dtd:1"].rank == 4
    random_row = row(probe, "cls[-1]", weights=RANDOM_W)
    assert random_row.cells["dtd:1"].rank == 5
    # mean and average rank only over the cells a row has
    assert random_row.mean == 12.3 and random_row.avg_rank == 5
    assert ens.avg_rank == pytest.approx((1 + 1.5 + 1) / 3)
    patch_row = row(probe, "cls[-4:]+patch[-1]")
    assert CALTECH not in patch_row.cells
    assert patch_row.avg_rank == pytest.approx((1.5 + 2) / 2)
    # ipvit shows its last-epoch top1 unless the paper's max-over-epochs metric is asked for
    assert row(probe, "prelogits", protocol="ipvit", weights=RN50_W).cells["gtsrb"].value == 13.9

    fewshot = section(board, "fewshot")
    assert fewshot.metric == "accuracy"
    ncc = row(fewshot, "cls[-4:]", protocol="fewshot-5w5s", variant="ncc")
    assert (ncc.cells["gtsrb"].value, ncc.cells["gtsrb"].ci95, ncc.cells["gtsrb"].episodes) == (82.5, 0.6, 600)
    assert ncc.cells["gtsrb"].rank == 1 and ncc.cells["dtd:1"].rank == 2


def test_markdown_marks_best_and_missing(results):
    md = build_leaderboard(load(results)).to_markdown()

    def line(*parts):
        (found,) = [ln for ln in md.splitlines() if all(f"| {p} |" in ln for p in parts)]
        return found

    ens = line("`cls[-4:]`", "default", "hub:fb_in1k 1a2b3c4d5e6f")
    assert "| **90.5** | **72.6** | **78.3** | **80.5** |" in ens
    assert "| **72.6** |" in line("`cls[-4:]+patch[-1]`", "default")  # a tie: both bold
    assert "| — | 12.3 | — | 12.3* | 5.00* |" in line("`cls[-1]`", "random 9f8e7d6c5b4a")
    assert "| **71.2±0.8** | 80.0±0.5 |" in line("fewshot-5w5s/lr")
    assert "| 69.0±0.9 | **82.5±0.6** |" in line("fewshot-5w5s/ncc")


def test_notes_trace_every_number(results):
    notes = "\n".join(build_leaderboard(load(results)).notes)
    assert "sha256 1a2b3c4d5e6f" in notes and "hub:timm/deit_small_patch16_224.fb_in1k" in notes
    assert "random (sha256 9f8e7d6c5b4a)" in notes
    assert "Seed: 0 for every cell" in notes
    assert "fewshot-5w5s/lr 600" in notes
    assert "caltech101 (imagefolder:/data/caltech101): train=train+val, test=test" in notes
    # gtsrb splits differ between protocols: each is listed with the protocols that used it
    assert "train=train, test=test [ipvit]" in notes
    assert "vtbench version: 0.1.0" in notes
    assert "Not shown: 28 per-block records" in notes
    assert "the paper reported the maximum over epochs (--metric top1_max_over_epochs)" in notes


def test_store_files_that_are_not_json_are_reported_not_dropped(results):
    board = build_leaderboard(load(results))
    (results / "torn.json").write_text('{"schema": ')  # e.g. a hand edit gone wrong
    (results / "episodes.json").write_text('{"format": "vtbench-episodes"}')  # valid JSON, not a record
    table = load(results)
    assert table.unreadable == [str(results / "torn.json")]
    notes = build_leaderboard(table).notes
    assert notes[:-1] == board.notes
    assert notes[-1] == f"Not read: 1 file in the results store that is not valid JSON: {results / 'torn.json'}."


def test_one_identity_in_two_files_keeps_the_newer(tmp_path):
    rec = record(model=DEIT, weights=DEIT_W, dataset="gtsrb", tokens="cls[-1]", metrics={"top1": 50.0})
    save(tmp_path, rec)
    newer = dict(rec, metrics={"top1": 51.0}, created="2026-02-01T00:00:00+0000")
    (tmp_path / "copied-in.json").write_text(json.dumps(dict(newer, schema="vtbench-result/1")))
    (kept,) = load(tmp_path).records
    assert kept["metrics"]["top1"] == 51.0 and kept["_path"] == str(tmp_path / "copied-in.json")
    # A record written before precision was recorded (a CPU run) keeps its identity; bf16 features do not.
    legacy = {k: v for k, v in rec.items() if k != "precision"}
    assert identity(legacy) == identity(rec) != identity(dict(rec, precision="bf16-autocast"))


def test_variant_notes_describe_every_part():
    from vtbench.report.leaderboard import variant_note

    assert variant_note("ncc+center+C0.1+nol2+300ep+q5+classes-all+splits-train-test") == (
        "ncc+center+C0.1+nol2+300ep+q5+classes-all+splits-train-test: nearest centroid (cosine similarity to "
        "the support-class means), features centred on the episode's support mean (SimpleShot), C = 0.1 "
        "(default 1), features not L2-normalised, 300 episodes, 5 queries per class, episodes drawn from every "
        "class of the dataset, episodes drawn from splits train, test")
    assert variant_note("lr+classes-val+file-1a2b3c4d") == (
        "lr+classes-val+file-1a2b3c4d: logistic regression fitted on each episode's support set, episodes drawn "
        "from the dataset's val classes, episodes replayed from a file (sha256 1a2b3c4d...)")
    assert variant_note("lr+mystery") == ("lr+mystery: logistic regression fitted on each episode's support set, "
                                          "mystery (no description registered; see the records)")


def test_metric_max_over_epochs_shows_paper_numbers(results):
    board = build_leaderboard(load(results), metric="top1_max_over_epochs")
    assert [s.task for s in board.sections] == ["probe"]
    (r,) = board.sections[0].rows
    assert (r.model, r.protocol, r.cells["dtd:1"].value, r.cells["gtsrb"].value) == (RN50, "ipvit", 54.1, 14.3)
    notes = "\n".join(board.notes)
    assert "as the IPViT paper reported" in notes
    assert "Not shown: 9 probe records without metric top1_max_over_epochs" in notes
    assert "Not shown: 4 fewshot records without metric top1_max_over_epochs" in notes


def test_filters(results):
    table = load(results)
    board = build_leaderboard(table, tokens=["cls[ -4: ]"], models=DEIT, protocols=["default", "fewshot-5w5s"])
    assert [(s.task, [(r.tokens, r.protocol_label) for r in s.rows]) for s in board.sections] == [
        ("probe", [("cls[-4:]", "default")]),
        ("fewshot", [("cls[-4:]", "fewshot-5w5s/lr"), ("cls[-4:]", "fewshot-5w5s/ncc")]),
    ]
    per_block = build_leaderboard(table, tokens=["cls[3]", "stage[1]"])
    assert [(r.model, r.tokens, r.cells["dtd:1"].value) for r in per_block.sections[0].rows] == [
        (DEIT, "cls[3]", 39.0), (RN50, "stage[1]", 30.0)]
    only_dtd = build_leaderboard(table, datasets="dtd", protocols="ipvit")
    assert only_dtd.sections[0].datasets == ["dtd:1"]
    with pytest.raises(VTError, match=r"no results match --protocol nope \(available: default, fewshot-5w5s, ipvit\)"):
        build_leaderboard(table, protocols="nope")
    with pytest.raises(VTError, match="no results match --models"):
        build_leaderboard(table, models=["vit_huge"])
    with pytest.raises(VTError, match="no result has metric 'f1'"):
        build_leaderboard(table, metric="f1")


def test_seeds_of_one_result_are_one_row_with_mean_and_std(tmp_path):
    for seed, top1 in ((0, 50.0), (1, 52.0), (2, 54.0)):
        save(tmp_path, record(model=DEIT, weights=DEIT_W, dataset="gtsrb", tokens="cls[-1]", seed=seed,
                              metrics={"top1": top1}))
    save(tmp_path, record(model=DEIT, weights=DEIT_W, dataset="gtsrb", tokens="cls[-4:]", seed=0,
                          metrics={"top1": 60.0}))
    board = build_leaderboard(load(tmp_path))
    md = board.to_markdown()
    (multi,) = [r for r in board.sections[0].rows if r.tokens == "cls[-1]"]
    cell = multi.cells["gtsrb"]
    assert (cell.value, cell.std, cell.seeds, cell.values) == (52.0, 2.0, [0, 1, 2], [50.0, 52.0, 54.0])
    assert "| `deit_small_patch16_224` | `cls[-1]` | default | 0,1,2 | 52.0±2.0 |" in md
    assert "| Model | Tokens | Protocol | Seed | gtsrb | Mean | Avg rank |" in md
    assert "mean ± std over seeds" in md.splitlines()[0]
    assert "Seeds: 0, 1, 2 (see the Seed column); a cell with several is their mean ± sample std (n-1)." in board.notes
    assert "Weights" not in md.split("**Notes**")[0]
    csv_rows = list(csv.DictReader(io.StringIO("\n".join(l for l in board.to_csv().splitlines() if l[:1] != "#"))))
    assert sorted(r["seeds"] for r in csv_rows) == ["0", "0,1,2"]


def test_random_init_always_shows_its_weights(tmp_path):
    save(tmp_path, record(model=DEIT, weights={"source": "random-init:seed=0", "sha256": "7a" * 32},
                          dataset="gtsrb", tokens="cls[-1]", metrics={"top1": 5.0}))
    md = build_leaderboard(load(tmp_path)).to_markdown()
    assert "| Model | Tokens | Protocol | Weights | gtsrb |" in md and "random-init:seed=0 7a7a" in md


def test_means_over_fewer_datasets_are_marked(results):
    sec = section(leaderboard_from_dir(results), "probe")
    assert row(sec, "cls[-4:]").partial is False and row(sec, "cls[-4:]+patch[-1]").partial is True
    md = leaderboard_from_dir(results).to_markdown()
    assert "| 74.8* | 1.75* |" in md and "* = Mean and Avg rank over only the datasets" in md


def test_dataset_labels_stay_unambiguous():
    assert dataset_labels(["dtd:1", "dtd:2", "gtsrb", "csv:/x/flowers.csv"]) == {
        "dtd:1": "dtd", "dtd:2": "dtd:2", "gtsrb": "gtsrb", "csv:/x/flowers.csv": "flowers"}
    assert dataset_labels(["imagefolder:/a/caltech101", "imagefolder:/b/caltech101", "caltech101"]) == {
        "imagefolder:/a/caltech101": "a/caltech101",
        "imagefolder:/b/caltech101": "b/caltech101",
        "caltech101": "caltech101",
    }
    assert dataset_labels(["dtd", "dtd:1"]) == {"dtd": "dtd", "dtd:1": "dtd:1"}


def test_csv_parses_and_json_round_trips(results):
    board = build_leaderboard(load(results))
    text = board.to_csv()
    data = [line for line in text.splitlines() if not line.startswith("#")]
    rows = list(csv.DictReader(io.StringIO("\n".join(data))))
    assert len(rows) == sum(len(s.rows) for s in board.sections) == 7
    ens = [r for r in rows if r["tokens"] == "cls[-4:]" and r["protocol"] == "default"][0]
    assert (float(ens["dtd:1"]), float(ens[CALTECH]), ens["weights_sha256"], ens["seeds"]) == (
        72.6, 90.5, DEIT_W["sha256"], "0")
    lr = [r for r in rows if r["variant"] == "lr"][0]
    assert (float(lr["gtsrb"]), float(lr["gtsrb ci95"]), lr[CALTECH]) == (80.0, 0.5, "")
    assert [line[2:] for line in text.splitlines() if line.startswith("# ")] == board.notes

    loaded = json.loads(board.to_json())
    assert loaded["schema"] == "vtbench-leaderboard/1"
    again = Leaderboard.from_dict(loaded)
    assert again == board
    assert again.to_markdown() == board.to_markdown()


def test_output_is_deterministic(tmp_path):
    write_records(tmp_path / "a")
    write_records(tmp_path / "b")
    a, b = leaderboard_from_dir(tmp_path / "a"), leaderboard_from_dir(tmp_path / "b")
    assert (a.to_markdown(), a.to_csv(), a.to_json()) == (b.to_markdown(), b.to_csv(), b.to_json())


def test_cli_leaderboard(results, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["leaderboard", str(results)])
    assert exc.value.code == 0
    assert capsys.readouterr().out == GOLDEN.read_text(encoding="utf-8")

    out = tmp_path / "board.json"
    with pytest.raises(SystemExit) as exc:
        main(["leaderboard", str(results), "--format", "json", "--out", str(out),
              "--models", f"{RN50},nobody", "--metric", "top1_max_over_epochs"])
    assert exc.value.code == 0
    (sec,) = json.loads(out.read_text())["sections"]
    assert [r["model"] for r in sec["rows"]] == [RN50]

    # The short flags of vt probe / vt fewshot mean the same here.
    filtered = []
    for flags in (["--models", RN50, "--datasets", "dtd", "--protocol", "default", "--tokens", "stage[2]"],
                  ["-m", RN50, "-d", "dtd", "-p", "default", "-t", "stage[2]"]):
        with pytest.raises(SystemExit) as exc:
            main(["leaderboard", str(results), *flags])
        assert exc.value.code == 0
        filtered.append(capsys.readouterr().out)
    assert filtered[0] == filtered[1] and f"`{RN50}`" in filtered[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["leaderboard", "{missing}"], "does not exist"),
        (["leaderboard", "{empty}"], "no vtbench results under"),
        (["leaderboard", "{results}", "--tokens", "cls[-2]"], "no results match --tokens cls[-2]"),
        (["leaderboard", "{results}", "--format", "xml"], "unknown --format 'xml'"),
        (["plot", "per-block", "{results}", "--dataset", "gtsrb", "--out", "{out}"], "no per-block probe results"),
        (["plot", "bars", "{empty}", "--out", "{out}"], "no vtbench results under"),
    ],
)
def test_cli_user_errors(results, tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    paths = {"missing": tmp_path / "missing", "empty": tmp_path / "empty", "results": results,
             "out": tmp_path / "fig.png"}
    with pytest.raises(SystemExit) as exc:
        main([a.format(**paths) for a in args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "fig.png").exists()


# --------------------------------------------------------------------------------------------
# Plots


def assert_png(path: Path, min_bytes: int = 10_000) -> tuple[int, int]:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > min_bytes
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


def test_plot_per_block(results, tmp_path):
    out = tmp_path / "figs" / "per_block.png"
    fig = plot_per_block(load(results), "dtd", out)
    assert assert_png(out) == (800, 500)
    (ax,) = fig.axes
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
    assert lines == {
        f"{DEIT} · cls": (list(range(12)), [30.0 + 3 * b for b in range(12)]),
        f"{DEIT} · patch": (list(range(12)), [28.0 + 2 * b for b in range(12)]),
        f"{RN50} · stage": ([0, 1, 2, 3], [20.0, 30.0, 40.0, 50.0]),
    }
    assert "dtd" in ax.get_title() and "top1" in ax.get_title() and "default" in ax.get_title()

    only = plot_per_block(load(results), "dtd:1", tmp_path / "rn.png", models=[RN50])
    assert [line.get_label() for line in only.axes[0].get_lines()] == [f"{RN50} · stage"]
    with pytest.raises(VTError, match="no per-block probe results"):
        plot_per_block(load(results), "dtd", tmp_path / "x.png", protocol="ipvit")


def test_plot_bars(results, tmp_path):
    out = tmp_path / "bars.png"
    fig = plot_bars(load(results), out, models=[DEIT], tokens=["cls[-4:]", "cls[-1]"])
    assert_png(out)
    probe_ax, fewshot_ax = fig.axes
    assert [t.get_text() for t in probe_ax.get_xticklabels()] == ["caltech101", "dtd", "gtsrb"]
    bars = {c.get_label(): [p.get_height() for p in c.patches] for c in probe_ax.containers}
    assert bars[f"{DEIT} · cls[-4:] · default · hub:fb_in1k 1a2b3c4d5e6f"] == [90.5, 72.6, 78.3]
    random_bars = bars[f"{DEIT} · cls[-1] · default · random 9f8e7d6c5b4a"]
    assert random_bars[1] == 12.3 and random_bars[0] != random_bars[0]  # NaN: no caltech101 result
    # few-shot bars carry their 95% CI as error bars
    (lr,) = [c for c in fewshot_ax.containers if c.get_label().endswith("fewshot-5w5s/lr")]
    assert [p.get_height() for p in lr.patches] == [71.24, 80.0]
    (segments,) = [s.get_segments() for s in lr.errorbar.lines[2]]
    assert [(seg[0][1], seg[1][1]) for seg in segments] == [
        pytest.approx((71.24 - 0.81, 71.24 + 0.81)), pytest.approx((80.0 - 0.5, 80.0 + 0.5))]
    # the y-axis starts where the data are, and every bar says its value
    assert 0 < fewshot_ax.get_ylim()[0] < 69.0
    assert "71.2" in [t.get_text() for t in fewshot_ax.texts]
    # more series than matplotlib's 10-colour cycle: still a distinct look for each
    many = plot_bars(load(results), tmp_path / "many12.png", tokens=[f"cls[{i}]" for i in range(12)])
    styles = [(c.patches[0].get_facecolor(), c.patches[0].get_hatch()) for c in many.axes[0].containers]
    assert len(styles) == 12 and len(set(styles)) == 12
    with pytest.raises(VTError, match="too many for one bar chart"):
        plot_bars(load(results), tmp_path / "many.png", tokens=[f"cls[{i}]" for i in range(12)] + ["patch[0:6]"]
                  + [f"patch[{i}]" for i in range(12)])


def test_cli_plots(results, tmp_path, capsys):
    for args in (["per-block", str(results), "--dataset", "dtd"], ["bars", str(results), "--protocol", "ipvit"]):
        out = tmp_path / f"{args[0]}.png"
        with pytest.raises(SystemExit) as exc:
            main(["plot", *args, "--out", str(out)])
        assert exc.value.code == 0
        assert_png(out)


def test_features_note_says_what_norm_did_per_architecture(tmp_path):
    save(tmp_path, record(model=RN50, weights=RN50_W, dataset="gtsrb", tokens="prelogits", arch="cnn",
                          metrics={"top1": 50.0}))
    save(tmp_path, record(model=DEIT, weights=DEIT_W, dataset="gtsrb", tokens="cls[-1]", arch="vit",
                          metrics={"top1": 60.0}))
    (note,) = [n for n in build_leaderboard(load(tmp_path)).notes if n.startswith("Features")]
    assert f"{RN50} [" in note and "no final norm to apply (CNN" in note
    assert f"{DEIT} [" in note and "the final norm on every block (--norm)" in note and "ViTs:" not in note


def test_unconverged_probes_say_what_and_reach_the_notes(tmp_path):
    from vtbench.results import convergence_note

    solver = {"tol": {"selection": 1e-5, "refit": 1e-5},
              "selection": {"converged": [True, False, True], "grad_norm": [0, 1, 0], "iterations": [1, 1, 1]},
              "refit": {"converged": True, "grad_norm": 1e-6, "iterations": 3, "loss": 0.1}}
    selection = {"grid": [0.1, 1.0, 10.0], "chosen": 10.0, "val_top1": [1, 2, 3]}
    quiet = record(model=DEIT, weights=DEIT_W, dataset="gtsrb", tokens="cls[-1]", solver=solver, selection=selection,
                   metrics={"top1": 50.0})
    assert convergence_note(quiet) == "1/3 grid fits not converged" and convergence_note(quiet, decisive_only=True) == ""
    loud = dict(quiet, tokens="cls[-4:]", selection=dict(selection, chosen=1.0),
                solver=dict(solver, refit=dict(solver["refit"], converged=False, grad_norm=3e-4)))
    assert convergence_note(loud) == ("refit not converged (measure 3.0e-04 > 1e-05); chosen l2=1 not converged in the "
                                      "selection; 1/3 grid fits not converged")
    save(tmp_path, quiet)
    save(tmp_path, loud)
    notes = build_leaderboard(load(tmp_path)).notes
    (note,) = [n for n in notes if n.startswith("Not converged")]
    assert "cls[-4:] default on gtsrb: refit not converged" in note and "cls[-1]" not in note


def test_results_on_other_images_are_other_rows_and_curves(tmp_path):
    def refs(fingerprint, root):
        return {"train": [{"key": fingerprint * 4, "split": "train", "data_fingerprint": fingerprint * 8,
                           "dataset_root": root, "rows": 10, "n_skipped": 0, "skipped": []}]}

    for fingerprint, root, top1 in (("a", "/data/dtd", 80.0), ("b", "/copy/dtd", 70.0)):
        save(tmp_path, record(model=DEIT, weights=DEIT_W, dataset="dtd:1", tokens="cls[-1]", caches=refs(fingerprint, root),
                              metrics={"top1": top1}))
        for block in range(3):
            save(tmp_path, record(model=DEIT, weights=DEIT_W, dataset="dtd:1", tokens=f"cls[{block}]",
                                  caches=refs(fingerprint, root), metrics={"top1": top1 + block}))
    board = build_leaderboard(load(tmp_path))
    values = sorted(r.cells["dtd:1"].value for r in board.sections[0].rows)
    assert values == [70.0, 80.0]  # never one cell holding whichever record came last
    md = board.to_markdown()
    assert "| Data |" in md and "(/copy/dtd)" in md and "(/data/dtd)" in md
    fig = plot_per_block(load(tmp_path), "dtd:1", tmp_path / "pb.png")
    labels = sorted(line.get_label() for line in fig.axes[0].get_lines())
    assert len(labels) == 2 and "(/copy/dtd)" in labels[0] and "(/data/dtd)" in labels[1]
