"""CROHME splits in the BTTR/CoMER layout, read from folders or straight from zip files.

A data root holds, per split (``train``, ``2014``, ``2016``, ``2019``, ...), either a folder
``<root>/<split>/`` with ``caption.txt`` and ``<name>.bmp`` files, or a zip ``<root>/<split>.zip`` holding that
folder. The root may also be a zip itself holding ``<split>/`` folders (CoMER's ``data.zip``). Folders win over
zips. ``caption.txt`` lines are ``name<TAB>tok tok ...``.

Opening a split reads the captions and every image header (not the pixels) so buckets can be built from sizes;
pixels are decoded in ``__getitem__``.
"""
from __future__ import annotations

import copy
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple, Sequence

import torch
from torch.utils.data import Dataset

from ..errors import DataError, did_you_mean
from ..registry import DATASETS
from ..vocab import Vocabulary
from .images import array_to_tensor, read_image_bytes, read_image_size
from .report import DataReport

CAPTION_FILE = "caption.txt"
IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg")

REASON_UNKNOWN_TOKEN = "caption token not in the dictionary"
REASON_EMPTY_CAPTION = "empty caption"
REASON_DUPLICATE = "duplicate name"
REASON_MISSING_IMAGE = "missing image"
REASON_UNREADABLE_IMAGE = "unreadable image"

LAYOUT_HELP = ("a data root is a directory with <split>/caption.txt + <split>/<name>.bmp folders or <split>.zip "
               "files holding them (train.zip, 2014.zip, ...), or a zip holding <split>/ folders; "
               "set it with data.root=DIR")
SKIP_HINT = " (set data.skip_bad=true to skip and count bad samples instead)"
ZIP_HINT = ("; the zip is damaged or incomplete (an interrupted download or copy?): check it with 'unzip -t' and "
            "download or copy it again")


class SplitSource:
    """Where one split's files live: ``caption()`` bytes, image members by file name, descriptions for errors."""

    def caption(self) -> bytes:
        raise NotImplementedError

    def has(self, filename: str) -> bool:
        raise NotImplementedError

    def open(self, filename: str) -> IO[bytes]:
        raise NotImplementedError

    def read(self, filename: str) -> bytes:
        with self.open(filename) as f:
            return f.read()

    def describe(self, filename: str) -> str:
        raise NotImplementedError

    def tokens(self, caption: str) -> list[str]:
        """A caption's tokens (a format whose captions may be raw LaTeX tokenises them here)."""
        return caption.split()


class DirSource(SplitSource):
    def __init__(self, folder: Path):
        self.folder = folder
        # one directory listing instead of a stat per sample
        self._files = {entry.name for entry in os.scandir(folder) if entry.is_file()}

    def caption(self) -> bytes:
        return (self.folder / CAPTION_FILE).read_bytes()

    def has(self, filename: str) -> bool:
        return filename in self._files

    def open(self, filename: str) -> IO[bytes]:
        return open(self.folder / filename, "rb")

    def describe(self, filename: str) -> str:
        return str(self.folder / filename)


class ZipSource(SplitSource):
    """Members ``<prefix><filename>`` of a zip file, read without extracting.

    A ZipFile handle shares its file offset with every process that inherits it, so each process opens its own
    (keyed by pid: DataLoader workers forked after the parent opened one reopen it) and pickling drops it.
    """

    def __init__(self, zip_path: Path, prefix: str, names: set[str] | None = None):
        self.zip_path = zip_path
        self.prefix = prefix
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        if names is None:
            names = set(self.archive().namelist())
        self._files = {n[len(prefix):] for n in names if n.startswith(prefix) and "/" not in n[len(prefix):]}

    def archive(self) -> zipfile.ZipFile:
        pid = os.getpid()
        if self._zip is None or self._zip_pid != pid:
            try:
                self._zip = zipfile.ZipFile(self.zip_path)
            except (OSError, zipfile.BadZipFile) as e:
                raise DataError(f"{self.zip_path}: cannot open the zip file ({e}){ZIP_HINT}") from None
            self._zip_pid = pid
        return self._zip

    def caption(self) -> bytes:
        return self.read(CAPTION_FILE)

    def has(self, filename: str) -> bool:
        return filename in self._files

    def open(self, filename: str) -> IO[bytes]:
        return self.archive().open(self.prefix + filename)

    def read(self, filename: str) -> bytes:
        try:
            return self.archive().read(self.prefix + filename)
        # corrupt member (bad CRC, truncated data), unsupported compression, encrypted member
        except (OSError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as e:
            raise DataError(f"{self.describe(filename)}: cannot read it from the zip ({e}){ZIP_HINT}") from None

    def describe(self, filename: str) -> str:
        return f"{self.zip_path}:{self.prefix}{filename}"

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_zip"], state["_zip_pid"] = None, None
        return state


def _zip_names(zip_path: Path) -> set[str]:
    try:
        with zipfile.ZipFile(zip_path) as zf:
            return set(zf.namelist())
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{zip_path}: cannot open the zip file ({e}){ZIP_HINT}") from None


def available_splits(root: str | os.PathLike) -> list[str]:
    """Split names found under a data root (folders with caption.txt, <split>.zip files, or inside a root zip)."""
    root = Path(root)
    found: set[str] = set()
    if root.is_file() and zipfile.is_zipfile(root):
        for name in _zip_names(root):
            parts = name.split("/")
            if len(parts) == 2 and parts[1] == CAPTION_FILE:
                found.add(parts[0])
        return sorted(found)
    if root.is_dir():
        for entry in os.scandir(root):
            if entry.is_dir() and (Path(entry.path) / CAPTION_FILE).is_file():
                found.add(entry.name)
            elif entry.is_file() and entry.name.endswith(".zip"):
                found.add(entry.name[: -len(".zip")])
    return sorted(found)


def open_split(root: str | os.PathLike | None, split: str) -> tuple[SplitSource, str]:
    """The source of ``split`` under ``root`` and a description of its caption file (for messages)."""
    split = str(split)  # YAML reads `data.val_split=2014` as a number
    if root is None or str(root) == "":
        raise DataError("data.root is not set: " + LAYOUT_HELP)
    root_path = Path(root).expanduser()
    if not root_path.exists():
        raise DataError(f"data root '{root}' does not exist: " + LAYOUT_HELP)

    if root_path.is_file():
        if not zipfile.is_zipfile(root_path):
            raise DataError(f"data root '{root}' is a file but not a zip: " + LAYOUT_HELP)
        names = _zip_names(root_path)
        if f"{split}/{CAPTION_FILE}" in names:
            source = ZipSource(root_path, f"{split}/", names)
            return source, source.describe(CAPTION_FILE)
        raise _missing_split(root_path, split, looked=[f"{root_path}:{split}/{CAPTION_FILE}"])

    folder = root_path / split
    if (folder / CAPTION_FILE).is_file():  # a folder wins over a zip of the same split
        source = DirSource(folder)
        return source, source.describe(CAPTION_FILE)
    zip_path = root_path / f"{split}.zip"
    if zip_path.is_file():
        names = _zip_names(zip_path)
        for prefix in (f"{split}/", ""):  # <split>.zip holds <split>/...; tolerate files at the top level too
            if prefix + CAPTION_FILE in names:
                source = ZipSource(zip_path, prefix, names)
                return source, source.describe(CAPTION_FILE)
        raise DataError(f"{zip_path}: no {split}/{CAPTION_FILE} inside the zip; expected members "
                        f"{split}/{CAPTION_FILE} and {split}/<name>.bmp")
    raise _missing_split(root_path, split, looked=[str(folder / CAPTION_FILE), str(zip_path)])


def _missing_split(root: Path, split: str, looked: list[str]) -> DataError:
    splits = available_splits(root)
    found = ", ".join(splits) if splits else "none"
    return DataError(f"data root '{root}': split '{split}' not found{did_you_mean(split, splits)} "
                     f"(looked for {' and '.join(looked)}); splits found there: {found}. A" + LAYOUT_HELP[1:])


@dataclass
class SampleRecord:
    """One caption line whose image header has been read."""

    name: str
    ids: list[int]
    height: int
    width: int
    image_file: str  # file name inside the split folder / zip prefix
    where: str  # "<caption file>:<line>", for messages

    @property
    def area(self) -> int:
        return self.height * self.width


class Sample(NamedTuple):
    name: str
    image: torch.Tensor  # [1, h, w] float32 in [0, 1]
    ids: list[int]


@DATASETS.register("crohme")
class CrohmeDataset(Dataset):
    """One CROHME split: ``dataset[i]`` is a :class:`Sample` (name, [1, h, w] image, token ids).

    Every problem raises a :class:`DataError` naming the caption file and line (and the image file or zip member);
    with ``skip_bad=True`` the sample is left out and counted in ``report`` instead.
    """

    def __init__(self, root: str | os.PathLike | None, split: str, vocab: Vocabulary, skip_bad: bool = False,
                 report: DataReport | None = None):
        self.root = root
        self.split = str(split)
        self.vocab = vocab
        self.skip_bad = skip_bad
        self.report = report if report is not None else DataReport()
        self.source, self.caption_where = self.open_source(root, self.split)
        self.samples: list[SampleRecord] = self._read_samples()
        if not self.samples:
            detail = f" ({self.report.count(split=split)} bad samples skipped)" if self.report.count(split=split) else ""
            raise DataError(f"{self.caption_where}: no usable samples in split '{split}'{detail}")

    # --- reading --------------------------------------------------------------------------------------------
    @classmethod
    def open_source(cls, root: str | os.PathLike | None, split: str) -> tuple[SplitSource, str]:
        """The split's files and a description of its caption file; other formats override only this (and
        ``load_image`` for their pixels)."""
        return open_split(root, split)

    def _read_samples(self) -> list[SampleRecord]:
        try:
            raw = self.source.caption()
        except (OSError, zipfile.BadZipFile) as e:
            raise DataError(f"{self.caption_where}: cannot read the caption file ({e})") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise DataError(f"{self.caption_where}:{line}: not valid UTF-8 ({e.reason})") from None

        samples: list[SampleRecord] = []
        seen: dict[str, str] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue  # blank lines (a trailing newline, mostly)
            where = f"{self.caption_where}:{lineno}"
            record = self._read_line(line, where, seen)
            if record is not None:
                seen[record.name] = where
                samples.append(record)
        return samples

    def _bad(self, reason: str, message: str) -> None:
        if not self.skip_bad:
            raise DataError(message + SKIP_HINT)
        self.report.add(self.split, reason, message)

    def _read_line(self, line: str, where: str, seen: dict[str, str]) -> SampleRecord | None:
        name, _, rest = line.partition("\t") if "\t" in line else line.partition(" ")
        name, tokens = name.strip(), self.source.tokens(rest)
        if not tokens:
            self._bad(REASON_EMPTY_CAPTION, f"{where}: '{name}' has an empty caption (expected 'name<TAB>tokens')")
            return None
        if name in seen:
            self._bad(REASON_DUPLICATE, f"{where}: name '{name}' already used at {seen[name]}")
            return None
        try:
            ids = self.vocab.encode(tokens, where=where)
        except DataError as e:
            self._bad(REASON_UNKNOWN_TOKEN, f"{e} (add it to the dictionary or fix the caption)")
            return None
        # a name may carry its extension (HME100K's 'x.jpg', a labels.tsv's 'a.png') or not (CROHME's captions)
        candidates = ([name] if name.lower().endswith(IMAGE_EXTENSIONS) else []) + [name + e for e in IMAGE_EXTENSIONS]
        image_file = next((f for f in candidates if self.source.has(f)), None)
        if image_file is None:
            self._bad(REASON_MISSING_IMAGE, f"{where}: image for '{name}' not found: no "
                      f"{self.source.describe(name + IMAGE_EXTENSIONS[0])}")
            return None
        image_where = self.source.describe(image_file)
        try:
            with self.source.open(image_file) as f:
                height, width = read_image_size(f, where=image_where)
        except DataError as e:
            self._bad(REASON_UNREADABLE_IMAGE, f"{where}: {e}")
            return None
        except (OSError, zipfile.BadZipFile, EOFError, NotImplementedError, RuntimeError) as e:
            self._bad(REASON_UNREADABLE_IMAGE, f"{where}: {image_where}: cannot open the image ({e})")
            return None
        return SampleRecord(name=name, ids=ids, height=height, width=width, image_file=image_file, where=where)

    # --- access ---------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def read_image_file(self, index: int) -> tuple[SampleRecord, str, bytes]:
        """Sample ``index``'s record, where its image is (for messages) and the image file's bytes."""
        record = self.samples[index]
        image_where = self.source.describe(record.image_file)
        try:
            return record, image_where, self.source.read(record.image_file)
        except OSError as e:
            raise DataError(f"{record.where}: {image_where}: cannot read the image ({e})") from None
        except DataError as e:
            raise DataError(f"{record.where}: {e}") from None

    def load_image(self, index: int) -> torch.Tensor:
        """Decode sample ``index``'s image to [1, h, w] float32 in [0, 1] (raises DataError naming the file)."""
        record, image_where, data = self.read_image_file(index)
        try:
            return array_to_tensor(read_image_bytes(data, where=image_where), where=image_where)
        except DataError as e:
            raise DataError(f"{record.where}: {e}") from None

    def __getitem__(self, index: int) -> Sample:
        record = self.samples[index]
        return Sample(record.name, self.load_image(index), list(record.ids))

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.samples]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) per sample, from the image headers."""
        return [(r.height, r.width) for r in self.samples]

    @property
    def caption_lengths(self) -> list[int]:
        return [len(r.ids) for r in self.samples]

    def select(self, indices: Sequence[int]) -> "CrohmeDataset":
        """A dataset over some of this one's samples (shares the file source and the report)."""
        subset = copy.copy(self)
        subset.samples = [self.samples[i] for i in indices]
        return subset

    def __repr__(self) -> str:
        return f"CrohmeDataset({self.caption_where}, {len(self)} samples)"
