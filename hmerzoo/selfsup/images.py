"""Images without captions: the dataset ``images`` (``data.format: images``) for the self-supervised stages.

A split is ``<data.root>/<split>`` (a folder, searched recursively) or ``<data.root>/<split>.zip``; the split ``.``
is the root itself. Every PNG/JPEG/BMP/TIFF found is a sample, including the images inside zip files met on the way,
so a CROHME root (``train/`` or ``train.zip``, its caption file ignored), a folder of scans or a zip of either
works. Samples carry no tokens. Pixels go through the photo path (:func:`~hmerzoo.data.images.prepare_image`):
grey, dark-on-light images turned white-on-black, CROHME bitmaps unchanged.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import IO

from ..data.crohme import CrohmeDataset, SampleRecord, SplitSource, ZipSource
from ..data.formats import _PhotoPixels
from ..data.images import read_image_size
from ..errors import DataError
from ..registry import DATASETS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ROOT_SPLIT = "."


class ImageTreeSource(SplitSource):
    """The image files under a folder (recursively) or in a zip, including members of zips inside the folder."""

    def __init__(self, base: Path):
        self.base = base
        self.files: dict[str, tuple[ZipSource | None, str]] = {}  # sample file name -> (zip or None, path/member)
        if base.is_file():
            self._add_zip(base, "")
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                rel = path.relative_to(base).as_posix()
                if name.lower().endswith(IMAGE_SUFFIXES):
                    self.files[rel] = (None, str(path))
                elif name.lower().endswith(".zip"):
                    self._add_zip(path, rel + "/")

    def _add_zip(self, path: Path, prefix: str) -> None:
        try:
            with zipfile.ZipFile(path) as zf:
                members = sorted(n for n in zf.namelist() if n.lower().endswith(IMAGE_SUFFIXES))
        except (OSError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: cannot open the zip file ({e})") from None
        source = ZipSource(path, "", set())
        for member in members:
            self.files[prefix + member] = (source, member)

    def caption(self) -> bytes:
        return b""

    def has(self, filename: str) -> bool:
        return filename in self.files

    def open(self, filename: str) -> IO[bytes]:
        source, where = self.files[filename]
        return source.open(where) if source is not None else open(where, "rb")

    def read(self, filename: str) -> bytes:
        source, where = self.files[filename]
        if source is not None:
            return source.read(where)
        with open(where, "rb") as f:
            return f.read()

    def describe(self, filename: str) -> str:
        source, where = self.files[filename]
        return source.describe(where) if source is not None else where


@DATASETS.register("images")
class ImageFolderDataset(_PhotoPixels, CrohmeDataset):
    """Every image of a split, no captions (``ids`` empty)."""

    @classmethod
    def open_source(cls, root: str | os.PathLike | None, split: str) -> tuple[SplitSource, str]:
        if root is None:
            raise DataError("data.root is not set: data.format=images reads the images under data.root/<split>")
        base = Path(root).expanduser()
        candidates = [base] if split in (ROOT_SPLIT, "") else [base / split, base / f"{split}.zip"]
        for path in candidates:
            if path.is_dir() or (path.is_file() and path.suffix.lower() == ".zip"):
                return ImageTreeSource(path), str(path)
        raise DataError(f"data.format=images: split '{split}' not found (looked for "
                        f"{' and '.join(str(c) for c in candidates)}); set data.train_split to a folder or zip "
                        f"under data.root, or to '{ROOT_SPLIT}' for data.root itself")

    def _read_samples(self) -> list[SampleRecord]:
        samples = []
        for name in self.source.files:
            where = self.source.describe(name)
            try:
                with self.source.open(name) as f:
                    height, width = read_image_size(f, where=where)
            except DataError as e:
                self._bad("unreadable image", str(e))
                continue
            except (OSError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as e:
                self._bad("unreadable image", f"{where}: cannot open the image ({e})")
                continue
            samples.append(SampleRecord(name=name, ids=[], height=height, width=width, image_file=name, where=where))
        if not samples and not self.report.count(split=self.split):
            raise DataError(f"{self.caption_where}: no images found (PNG, JPEG, BMP or TIFF, also inside zips)")
        return samples
