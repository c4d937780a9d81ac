"""Shared fixtures: isolated cache/results dirs, and the real assets in ../shared when present."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
LITE0_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"


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
