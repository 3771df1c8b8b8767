"""Shared fixtures. Real CROHME data comes from the repository's ``data/crohme`` (``$HMERZOO_DATA`` overrides), so
those tests run on a fresh clone; only the parity fixtures need ../shared and skip with a reason without it."""
from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE_SIZES = {"train": 64, "2014": 32}  # a small, complete data root for quick end-to-end runs


def shared_dir() -> Path:
    """../shared beside the repository, or $HMERZOO_SHARED (only the parity fixtures live there)."""
    return Path(os.environ.get("HMERZOO_SHARED", REPO.parent / "shared"))


def crohme_dir() -> Path:
    """The CROHME data root of the tests: $HMERZOO_DATA, else the repository's data/crohme."""
    return Path(os.environ.get("HMERZOO_DATA") or REPO / "data" / "crohme")


def make_sample(source: Path, dest: Path, sizes: dict[str, int] = SAMPLE_SIZES, seed: int = 0) -> Path:
    """A small data root at ``dest``: for each split, ``n`` images drawn (seeded) from ``source/<split>.zip``, as
    loose BMPs with their caption lines, plus the dictionary. Built at test time, so no images are committed."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "dictionary.txt").write_bytes((source / "dictionary.txt").read_bytes())
    for split, n in sizes.items():
        with zipfile.ZipFile(source / f"{split}.zip") as zf:
            lines = zf.read(f"{split}/caption.txt").decode("utf-8").splitlines()
            chosen = sorted(random.Random(seed).sample([ln for ln in lines if ln.strip()], n))
            (dest / split).mkdir(exist_ok=True)
            for line in chosen:
                name = line.split("\t", 1)[0]
                (dest / split / f"{name}.bmp").write_bytes(zf.read(f"{split}/{name}.bmp"))
            (dest / split / "caption.txt").write_text("\n".join(chosen) + "\n", encoding="utf-8")
    return dest


def _require_crohme() -> Path:
    root = crohme_dir()
    if not (root / "train.zip").is_file():
        pytest.skip(f"CROHME data not found at {root} (the repository's data/crohme, or set HMERZOO_DATA)")
    return root


@pytest.fixture
def crohme_root() -> Path:
    return _require_crohme()


@pytest.fixture(scope="session")
def _session_sample(tmp_path_factory) -> Path:
    return make_sample(_require_crohme(), tmp_path_factory.mktemp("crohme_sample"))


@pytest.fixture
def sample_root(_session_sample) -> Path:
    """64 training and 32 CROHME-2014 samples from the repository's zips, in a temporary folder."""
    return _session_sample


@pytest.fixture
def parity_dir() -> Path:
    d = shared_dir() / "fixtures" / "parity"
    if not d.is_dir():
        pytest.skip(f"parity fixtures not found at {d} (place ../shared beside the repo or set HMERZOO_SHARED)")
    return d
