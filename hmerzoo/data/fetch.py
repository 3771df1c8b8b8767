"""``hmerzoo data fetch crohme``: CROHME for an install without a checkout of the repository.

Downloads the ``data.zip`` the CoMER repository publishes (BTTR's has the same layout: ``data/<split>/caption.txt``
with the images beside it or in ``img/``), checks its sha256, and unpacks it to the data-root layout hmerzoo reads
(``<split>/caption.txt`` + ``<split>/<name>.bmp``, ``dictionary.txt``). Everything happens in a temporary folder
beside the destination, renamed into place only at the end, so a failed download, a checksum mismatch or an
interrupted run leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import IO, Callable

from ..config import DICTIONARY_FILE, user_data_root
from ..errors import DataError
from .crohme import CAPTION_FILE, IMAGE_EXTENSIONS

# CoMER's data.zip (Green-Wood/CoMER, the repository root on branch master). Its sha256 is not known here: the
# archive itself could not be downloaded when this was written, so CROHME_SHA256 stays None. What is known is the
# file's git blob id in that repository (from its tree at commit ee15cdbe): a download from the default URL is
# checked against it (sha1 of "blob <size>\0" + the bytes, what `git hash-object` computes). --sha256 H checks H.
CROHME_URL = "https://github.com/Green-Wood/CoMER/raw/master/data.zip"
CROHME_SHA256: str | None = None
CROHME_GIT_BLOB = "4f6b9856f8d9a26b885fe05a64546e2ff89ba253"

# CoMER's dictionary.txt (comer/datamodule/dictionary.txt), in its order: the ids of CoMER-trained and converted
# models follow it, so a fetched root gets this file and not one rebuilt from the captions (data.zip has none)
CROHME_DICTIONARY = (
    "! ( ) + , - . / 0 1 2 3 4 5 6 7 8 9 < = > A B C E F G H I L M N P R S T V X Y [ \\Delta \\Pi \\alpha \\beta "
    "\\cdot \\cdots \\cos \\div \\exists \\forall \\frac \\gamma \\geq \\in \\infty \\int \\lambda \\ldots \\leq \\lim "
    "\\limits \\log \\mu \\neq \\phi \\pi \\pm \\prime \\rightarrow \\sigma \\sin \\sqrt \\sum \\tan \\theta \\times "
    "\\{ \\} ] ^ _ a b c d e f g h i j k l m n o p q r s t u v w x y z { | }").split()

# dataset -> (default URL, its sha256 or None, its git blob id or None)
DATASETS = {"crohme": (CROHME_URL, CROHME_SHA256, CROHME_GIT_BLOB)}
CHUNK = 1 << 16


def _progress(total: int | None, label: str, stream: IO[str]) -> tuple[Callable[[int], None], Callable[[], None]]:
    """(advance, close) of a rich download bar on ``stream``."""
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                   TimeRemainingColumn(), console=Console(file=stream), transient=False)
    task = bar.add_task(label, total=total)
    bar.start()
    return (lambda n: bar.advance(task, n)), bar.stop


def download(url: str, dest: Path, progress: bool = True, stream: IO[str] | None = None) -> str:
    """Copy ``url`` (http(s) or file://) to ``dest``; returns the sha256 of what was written."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as out:
            length = response.headers.get("Content-Length") if hasattr(response, "headers") else None
            total = int(length) if length and length.isdigit() else None
            advance, close = (_progress(total, Path(url).name or "download", stream or sys.stderr) if progress
                              else (lambda n: None, lambda: None))
            try:
                while chunk := response.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    advance(len(chunk))
            finally:
                close()
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise DataError(f"cannot download {url}: {reason}") from None
    return digest.hexdigest()


def git_blob_id(path: Path) -> str:
    """The id git gives the file's contents (``git hash-object``): sha1 over ``blob <size>\\0`` and the bytes."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _split_dirs(names: list[str]) -> dict[str, str]:
    """split -> its folder in the archive (the folder of each ``caption.txt``: ``data/train/`` -> ``train``)."""
    found = {}
    for name in names:
        parts = name.split("/")
        if parts[-1] == CAPTION_FILE and len(parts) >= 2:
            split = parts[-2]
            if split in ("", ".", "..") or split in found:
                raise DataError(f"archive: unexpected caption file {name} (split '{split}' twice or unnamed)")
            found[split] = "/".join(parts[:-1]) + "/"
    return found


def unpack_archive(archive: Path, out: Path) -> dict[str, int]:
    """Write the data-root layout of a BTTR/CoMER-style ``data.zip`` into ``out``; returns samples per split.

    Images are taken from the split's folder or its ``img/`` subfolder and written flat under their base name
    (no path from the archive is used as is, so a crafted member name cannot write outside ``out``)."""
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise DataError(f"{archive}: not a zip archive (a wrong --url, or an error page instead of the data?)") from None
    counts = {}
    with zf:
        names = zf.namelist()
        splits = _split_dirs(names)
        if not splits:
            raise DataError(f"archive: no <split>/{CAPTION_FILE} inside; not a BTTR/CoMER data.zip")
        for split, prefix in splits.items():
            target = out / split
            target.mkdir(parents=True)
            lines = [ln for ln in zf.read(prefix + CAPTION_FILE).decode("utf-8").splitlines() if ln.strip()]
            (target / CAPTION_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
            for name in names:
                rest = name[len(prefix):] if name.startswith(prefix) else None
                if rest is None or not rest.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                if "/" in rest and not rest.startswith("img/"):
                    continue
                base = rest.rpartition("/")[2]
                with zf.open(name) as src, open(target / base, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            counts[split] = len(lines)
        dictionary = [n for n in names if n.rpartition("/")[2] == DICTIONARY_FILE]
        if dictionary:
            (out / DICTIONARY_FILE).write_bytes(zf.read(dictionary[0]))
        else:
            (out / DICTIONARY_FILE).write_text("".join(t + "\n" for t in CROHME_DICTIONARY), encoding="utf-8")
    return counts


def fetch(dataset: str = "crohme", to: str | os.PathLike | None = None, url: str | None = None,
          sha256: str | None = None, progress: bool = True, stream: IO[str] | None = None) -> tuple[Path, str, bool]:
    """Download and unpack ``dataset`` to ``to`` (default: the user cache, ``$HMERZOO_HOME/datasets/crohme``).

    Returns (the data root, the archive's sha256, whether it was checked against a known checksum: ``sha256``, the
    dataset's sha256, or, for the default URL with no sha256 known, the file's git blob id)."""
    if dataset not in DATASETS:
        raise DataError(f"hmerzoo data fetch: unknown dataset '{dataset}' (known: {', '.join(DATASETS)})")
    default_url, default_sha, default_blob = DATASETS[dataset]
    url = url or default_url
    expected = (sha256 or (default_sha if url == default_url else None) or "").lower() or None
    # without a sha256, the default URL's file is checked against its git blob id
    expected_blob = default_blob if expected is None and url == default_url else None
    if "://" not in url:  # a plain path
        url = Path(url).resolve().as_uri()
    dest = Path(to).expanduser() if to is not None else user_data_root()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(f"{dest} already exists and is not empty; remove it or choose another folder with --to DIR")

    created = []  # parents this call makes, removed again on failure
    parent = dest.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", suffix=".partial", dir=dest.parent))
    done = False
    try:
        archive = work / "download.zip"
        digest = download(url, archive, progress=progress, stream=stream)
        if expected is not None and digest != expected:
            raise DataError(f"checksum mismatch for {url}: sha256 {digest}, expected {expected}; the download is "
                            "damaged or not the expected file, so nothing was kept")
        if expected_blob is not None and (blob := git_blob_id(archive)) != expected_blob:
            raise DataError(f"checksum mismatch for {url}: git blob id {blob}, expected {expected_blob} (the file "
                            "in the CoMER repository); the download is damaged or not that file, so nothing was kept")
        stage = work / "root"
        stage.mkdir()
        unpack_archive(archive, stage)
        if dest.is_dir():
            dest.rmdir()  # the empty destination folder the user named
        os.replace(stage, dest)
        done = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not done:
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break
    return dest, digest, expected is not None or expected_blob is not None


__all__ = ["CROHME_DICTIONARY", "CROHME_GIT_BLOB", "CROHME_SHA256", "CROHME_URL", "download", "fetch",
           "git_blob_id", "unpack_archive"]
