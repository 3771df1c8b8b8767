"""Dataset formats other than CROHME's, and the one rule that picks a dataset class for a data root.

``data.format`` names the layout of ``data.root``: ``crohme`` (:mod:`.crohme`), ``hme100k``, ``folder``, ``inkml``
(:mod:`.inkml_format`), or
``auto`` (the default: detected from the files, :func:`detect_format`). ``data.dataset``, when set, names a
dataset class directly and wins (a user's own class). :func:`dataset_class` is where that is decided; training and
evaluation both ask it.

- ``hme100k``: ``<split>_images/`` and ``<split>_labels.txt`` side by side in the root (splits ``train``, ``test``),
  label lines ``name.jpg<TAB>tok tok ...``. The images are colour camera photos, dark ink on light paper.
- ``folder``: one folder per split holding images and ``labels.tsv`` (or ``caption.txt``), lines
  ``name<TAB>caption``, the name with or without its extension; a caption that is not already space-separated
  tokens is raw LaTeX, tokenised by :mod:`.latex`.

Both read pixels through :func:`~.images.prepare_image` (the path ``predict`` takes for photos): gray, polarity
detected and made white-on-black, contrast stretched; no resizing, so the sizes read from the headers for bucketing
stay true. A CROHME-like image (white on black) comes back unchanged.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from PIL import Image

from ..errors import DataError
from ..registry import DATASETS
from .crohme import CAPTION_FILE, CrohmeDataset, DirSource, SplitSource, available_splits
from .images import prepare_image
from .inkml_format import inkml_splits
from .latex import tokens_of

FORMATS = ("crohme", "hme100k", "folder", "inkml")
LABELS_TSV = "labels.tsv"
HME100K_HELP = ("an HME100K root holds <split>_images/ folders and <split>_labels.txt files side by side "
                "(train_images/, train_labels.txt, test_images/, test_labels.txt)")
FOLDER_HELP = f"a folder root holds one folder per split with images and {LABELS_TSV} (or {CAPTION_FILE})"
# prepare_image's size step is a no-op inside these ranges: datasets keep their images' sizes (buckets use them)
_ANY_SIZE = (1, 1 << 30)


class LabelFileSource(DirSource):
    """Images in ``folder``, captions in ``label_path`` (which need not be inside it)."""

    def __init__(self, folder: Path, label_path: Path):
        super().__init__(folder)
        self.label_path = label_path

    def caption(self) -> bytes:
        return self.label_path.read_bytes()


class LatexLabelSource(LabelFileSource):
    """A label file whose captions may be raw LaTeX: those not already tokens are tokenised (``x^2`` ->
    ``x ^ { 2 }``, :func:`~.latex.tokens_of`)."""

    def tokens(self, caption: str) -> list[str]:
        return tokens_of(caption)


class _PhotoPixels:
    """``load_image`` through prepare_image: photos of dark ink on paper come out white-on-black like CROHME."""

    def load_image(self, index: int) -> torch.Tensor:
        record, image_where, data = self.read_image_file(index)
        try:
            with Image.open(io.BytesIO(data)) as pil:
                pil.load()
                return prepare_image(pil, height_range=_ANY_SIZE, width_range=_ANY_SIZE)
        except DataError as e:
            raise DataError(f"{record.where}: {e}") from None
        except (OSError, ValueError, SyntaxError) as e:  # PIL's decode errors
            raise DataError(f"{record.where}: {image_where}: cannot read the image ({type(e).__name__}: {e})") from None


def hme100k_splits(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name[: -len("_labels.txt")] for p in root.glob("*_labels.txt")
                  if (root / (p.name[: -len("_labels.txt")] + "_images")).is_dir())


def folder_splits(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / LABELS_TSV).is_file())


@DATASETS.register("hme100k")
class Hme100kDataset(_PhotoPixels, CrohmeDataset):
    """One HME100K split (``train`` or ``test``); samples, names and errors as :class:`CrohmeDataset`."""

    @classmethod
    def open_source(cls, root: str | os.PathLike | None, split: str) -> tuple[SplitSource, str]:
        root_path = _existing_root(root, HME100K_HELP)
        labels, images = root_path / f"{split}_labels.txt", root_path / f"{split}_images"
        if not (labels.is_file() and images.is_dir()):
            found = ", ".join(hme100k_splits(root_path)) or "none"
            raise DataError(f"data root '{root}': HME100K split '{split}' not found (looked for {labels} and "
                            f"{images}/); splits found there: {found}. {HME100K_HELP}")
        return LabelFileSource(images, labels), str(labels)


@DATASETS.register("folder")
class FolderDataset(_PhotoPixels, CrohmeDataset):
    """One split folder of images with ``labels.tsv`` (or ``caption.txt``)."""

    @classmethod
    def open_source(cls, root: str | os.PathLike | None, split: str) -> tuple[SplitSource, str]:
        folder = _existing_root(root, FOLDER_HELP) / split
        for name in (LABELS_TSV, CAPTION_FILE):
            if (folder / name).is_file():
                return LatexLabelSource(folder, folder / name), str(folder / name)
        found = ", ".join(folder_splits(Path(root))) or "none"
        raise DataError(f"data root '{root}': split '{split}' not found (looked for {folder / LABELS_TSV} and "
                        f"{folder / CAPTION_FILE}); splits with {LABELS_TSV} there: {found}. {FOLDER_HELP}")


def _existing_root(root: str | os.PathLike | None, help_text: str) -> Path:
    if root is None or str(root) == "":
        raise DataError("data.root is not set: " + help_text)
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"data root '{root}' is not a directory: " + help_text)
    return path


def _splits_by_format(path: Path) -> dict[str, list[str]]:
    """The formats whose layout ``path`` has, with the splits found for each (formats with none left out)."""
    inkml = inkml_splits(path)
    # a <split>.zip of InkML files is not a CROHME zip
    crohme = [s for s in available_splits(path) if s not in inkml or (path / s / CAPTION_FILE).is_file()]
    found = {"crohme": crohme, "hme100k": hme100k_splits(path), "folder": folder_splits(path), "inkml": inkml}
    return {fmt: splits for fmt, splits in found.items() if splits}


def detect_format(root: str | os.PathLike) -> str:
    """The format of a data root, from its files. Raises DataError when none or several formats match."""
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data root '{root}' does not exist (data.format=auto detects the format from its files)")
    found = list(_splits_by_format(path))
    if len(found) == 1:
        return found[0]
    expected = (f"crohme: <split>/{CAPTION_FILE} folders or <split>.zip files; hme100k: <split>_images/ + "
                f"<split>_labels.txt; folder: <split>/{LABELS_TSV}; inkml: <split>/*.inkml or <split>.zip of them")
    if not found:
        raise DataError(f"data root '{root}': no known dataset format found (expected {expected}); "
                        "set data.root to the right folder or data.format to one of " + ", ".join(FORMATS))
    raise DataError(f"data root '{root}' is ambiguous: it matches the formats {', '.join(found)}; set "
                    f"data.format to one of them (layouts: {expected})")


def dataset_class(root: str | os.PathLike, format: str = "auto", dataset: str | None = None) -> type:
    """The dataset class for a root: ``data.dataset`` when set, else ``data.format`` (``auto``: detected)."""
    if dataset is not None:
        return DATASETS.get(dataset, "data.dataset")
    if format == "auto":
        format = detect_format(root)
    return DATASETS.get(format, "data.format")


def splits_of(root: str | os.PathLike, format: str = "auto") -> list[str]:
    """The split names of a root in its format (``auto``: detected; an ambiguous root raises); [] when none."""
    path = Path(root).expanduser()
    if format == "auto":
        by_format = _splits_by_format(path) if path.exists() else {}
        if len(by_format) > 1:
            detect_format(root)  # raises, naming the candidates
        return next(iter(by_format.values()), [])
    return {"crohme": available_splits, "hme100k": hme100k_splits, "folder": folder_splits,
            "inkml": inkml_splits}[format](path)


def open_format_split(root: str | os.PathLike, split: str, format: str = "auto") -> tuple[SplitSource, str]:
    """A split's files (and its label file's description) in the root's format: what `hmerzoo data` reads."""
    return dataset_class(root, format).open_source(root, str(split))
