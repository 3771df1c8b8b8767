"""Shared fixtures. Tests that need ../shared (real CROHME data, parity fixtures) skip with a reason when it is
absent, so a fresh clone without it still passes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """../shared beside the repository, or $HMERZOO_SHARED; $HMERZOO_DATA points at the CROHME data itself."""
    return Path(os.environ.get("HMERZOO_SHARED", REPO.parent / "shared"))


def crohme_dir() -> Path:
    return Path(os.environ.get("HMERZOO_DATA", shared_dir() / "data" / "crohme"))


@pytest.fixture
def crohme_root() -> Path:
    root = crohme_dir()
    if not (root / "train.zip").is_file():
        pytest.skip(f"real CROHME data not found at {root} (set HMERZOO_DATA or place ../shared beside the repo)")
    return root


@pytest.fixture
def sample_root() -> Path:
    root = crohme_dir() / "sample"
    if not (root / "train" / "caption.txt").is_file():
        pytest.skip(f"CROHME sample not found at {root} (set HMERZOO_DATA or place ../shared beside the repo)")
    return root


@pytest.fixture
def parity_dir() -> Path:
    d = shared_dir() / "fixtures" / "parity"
    if not d.is_dir():
        pytest.skip(f"parity fixtures not found at {d} (place ../shared beside the repo or set HMERZOO_SHARED)")
    return d
