"""The ``inkml`` data format: one folder (or ``<split>.zip``) of InkML files per split, rendered once.

Training reads images, so each split is rendered on first use (:func:`render_files`, in parallel) to a cache of
the CROHME layout (``caption.txt`` + ``<name>.bmp``) under ``$HMERZOO_HOME/rendered`` (default
``~/.cache/hmerzoo/rendered``), keyed by the files (names, sizes, times), the render settings and the renderer's
version; later runs read the cache. Labels are the InkML ``truth`` (CROHME) or ``normalizedLabel`` (MathWriting)
tokenised by :mod:`hmerzoo.data.latex`. A file without a label or without ink is left out and listed in the
cache's ``skipped.txt``. ``hmerzoo data render`` writes the same layout where the user says.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import zipfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..config import HOME_ENV
from ..errors import DataError
from ..registry import DATASETS
from .crohme import CAPTION_FILE, CrohmeDataset, DirSource, SplitSource
from .inkml import RenderSettings, encode_bmp, parse_inkml, read_label, render
from .latex import tokenize

INKML_SUFFIX = ".inkml"
SKIPPED_FILE = "skipped.txt"
# part of the cache key: bump when rendering or tokenising changes what a cache holds
RENDER_VERSION = 1
INKML_HELP = "an InkML root holds one folder of .inkml files (or a <split>.zip of them) per split"


@dataclass(frozen=True)
class InkmlFile:
    """One InkML file: its sample name, and where it is (a path, or a zip and a member)."""

    name: str
    path: str
    member: str | None = None

    @property
    def where(self) -> str:
        return f"{self.path}:{self.member}" if self.member else self.path

    def read(self) -> bytes:
        if self.member is None:
            return Path(self.path).read_bytes()
        return _open_zip(self.path).read(self.member)

    def fingerprint(self) -> str:
        stat = os.stat(self.path)
        return f"{self.name}\t{self.where}\t{stat.st_size}\t{stat.st_mtime_ns}"


_ZIPS: dict[tuple[int, str], zipfile.ZipFile] = {}


def _open_zip(path: str) -> zipfile.ZipFile:
    """One open ZipFile per process and archive (reading a member then costs no re-read of the directory)."""
    key = (os.getpid(), path)
    if key not in _ZIPS:
        _ZIPS[key] = zipfile.ZipFile(path)
    return _ZIPS[key]


def _named(entries: list[tuple[str, str, str | None]]) -> list[InkmlFile]:
    """Sample names from file stems; a stem used twice (two subfolders) is qualified by its folder."""
    stems: dict[str, int] = {}
    for rel, _, _ in entries:
        stem = Path(rel).stem
        stems[stem] = stems.get(stem, 0) + 1
    out = []
    for rel, path, member in sorted(entries):
        stem = Path(rel).stem
        name = stem if stems[stem] == 1 else str(Path(rel).with_suffix("")).replace("/", "_").replace("\\", "_")
        out.append(InkmlFile(name, path, member))
    return out


def folder_files(folder: Path) -> list[InkmlFile]:
    """The .inkml files under a folder (subfolders included), sorted."""
    entries = [(p.relative_to(folder).as_posix(), str(p), None) for p in folder.rglob(f"*{INKML_SUFFIX}")]
    return _named(entries)


def zip_files(zip_path: Path) -> list[InkmlFile]:
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = [n for n in zf.namelist() if n.lower().endswith(INKML_SUFFIX)]
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{zip_path}: cannot open the zip file ({e})") from None
    return _named([(m, str(zip_path), m) for m in members])


def _zip_has_inkml(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.lower().endswith(INKML_SUFFIX) for n in zf.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _folder_has_inkml(path: Path) -> bool:
    return next(path.rglob(f"*{INKML_SUFFIX}"), None) is not None


def inkml_splits(root: str | os.PathLike) -> list[str]:
    """Splits of an InkML root: folders holding .inkml files, and zips holding them."""
    path = Path(root).expanduser()
    if not path.is_dir():
        return []
    found = set()
    for entry in path.iterdir():
        if entry.is_dir() and _folder_has_inkml(entry):
            found.add(entry.name)
        elif entry.is_file() and entry.suffix == ".zip" and _zip_has_inkml(entry):
            found.add(entry.stem)
    return sorted(found)


def split_files(root: str | os.PathLike | None, split: str) -> list[InkmlFile]:
    if root is None or str(root) == "":
        raise DataError("data.root is not set: " + INKML_HELP)
    path = Path(root).expanduser()
    folder, zip_path = path / split, path / f"{split}.zip"
    files = folder_files(folder) if folder.is_dir() else zip_files(zip_path) if zip_path.is_file() else []
    if not files:
        found = ", ".join(inkml_splits(path)) or "none"
        raise DataError(f"data root '{root}': no InkML split '{split}' (looked for {folder}/*{INKML_SUFFIX} and "
                        f"{zip_path}); InkML splits there: {found}. A" + INKML_HELP[1:])
    return files


def label_counts(root: str | os.PathLike, style: str = "crohme", splits: list[str] | None = None) -> dict[str, int]:
    """Token counts of the splits' labels (default: every split), read without rendering anything."""
    counts: dict[str, int] = {}
    for split in splits or inkml_splits(root):
        for item in split_files(root, split):
            try:
                label = read_label(item.read(), item.where)
            except (OSError, zipfile.BadZipFile) as e:
                raise DataError(f"{item.where}: cannot read it ({e})") from None
            for token in tokenize(label or "", style=style):
                counts[token] = counts.get(token, 0) + 1
    return counts


# --- rendering ------------------------------------------------------------------------------------------------
@dataclass
class RenderResult:
    out: Path
    rendered: int = 0
    skipped: list[str] = field(default_factory=list)  # "<file>: <why>"


def _render_one(job: tuple[InkmlFile, RenderSettings, str, str]) -> tuple[str, str | None, str | None]:
    """(name, caption or None, why it was skipped or None); the image is written beside the caption file."""
    item, settings, out_dir, style = job
    try:
        ink = parse_inkml(item.read(), item.where)
        tokens = tokenize(ink.label or "", style=style)
        if not tokens:
            return item.name, None, f"{item.where}: no label (no truth / normalizedLabel annotation)"
        image = render(ink, settings)
    except (DataError, OSError, zipfile.BadZipFile) as e:
        return item.name, None, f"{item.where}: {e}"
    Path(out_dir, f"{item.name}.bmp").write_bytes(encode_bmp(image))
    return item.name, " ".join(tokens), None


def render_files(files: list[InkmlFile], out: str | os.PathLike, settings: RenderSettings = RenderSettings(),
                 jobs: int | None = None, progress: bool = True, label: str = "render",
                 style: str = "crohme") -> RenderResult:
    """Renders InkML files to ``out`` in the CROHME layout (``caption.txt`` sorted by name, ``<name>.bmp``),
    the labels tokenised in ``style`` (:func:`~.latex.tokenize`: ``crohme`` or ``wap``).

    Everything is written to a temporary folder beside ``out`` and renamed at the end, so an interrupted render
    leaves no half-filled split behind. ``out`` must not exist yet.
    """
    out = Path(out)
    if out.exists():
        raise DataError(f"{out} exists already; remove it or write elsewhere")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    result = RenderResult(out)
    captions: dict[str, str] = {}
    try:
        jobs_list = [(f, settings, str(tmp), style) for f in files]
        workers = max(1, min(jobs or os.cpu_count() or 1, len(files) or 1))
        for name, caption, skipped in _run(jobs_list, workers, progress, label):
            if caption is None:
                result.skipped.append(skipped)
            else:
                captions[name] = caption
        (tmp / CAPTION_FILE).write_text("".join(f"{n}\t{captions[n]}\n" for n in sorted(captions)), encoding="utf-8")
        if result.skipped:
            (tmp / SKIPPED_FILE).write_text("".join(f"{s}\n" for s in result.skipped), encoding="utf-8")
        try:
            os.replace(tmp, out)
        except OSError:
            if out.is_dir():  # another process (a DDP rank) finished the same render first
                raise DataError(f"{out} exists already; remove it or write elsewhere") from None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.rendered = len(captions)
    return result


def _run(jobs: list, workers: int, progress: bool, label: str) -> Iterator[tuple[str, str | None, str | None]]:
    advance, close = _bar(len(jobs), label) if progress else ((lambda: None), (lambda: None))
    try:
        if workers == 1:
            results = map(_render_one, jobs)
            for r in results:
                advance()
                yield r
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for r in pool.map(_render_one, jobs, chunksize=max(1, min(64, len(jobs) // (workers * 8) or 1))):
                advance()
                yield r
    finally:
        close()


def _bar(total: int, label: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   console=Console(file=sys.stderr), transient=True)
    task = bar.add_task(label, total=total)
    bar.start()
    return (lambda: bar.advance(task)), bar.stop


# --- the cache and the dataset ----------------------------------------------------------------------------------
def render_cache_root() -> Path:
    home = os.environ.get(HOME_ENV) or os.path.join("~", ".cache", "hmerzoo")
    return Path(home).expanduser() / "rendered"


def cache_dir(root: str | os.PathLike, split: str, files: list[InkmlFile], settings: RenderSettings,
              style: str = "crohme") -> Path:
    """Where a split's rendering is cached: one folder per (files, settings, token style, renderer version)."""
    digest = hashlib.sha256(f"v{RENDER_VERSION}\n{Path(root).expanduser().resolve()}\n{split}\n{style}\n".encode())
    for f in files:
        digest.update(f.fingerprint().encode() + b"\n")
    safe_split = "".join(c if c.isalnum() or c in "-_." else "_" for c in split)
    return render_cache_root() / f"{safe_split}-{digest.hexdigest()[:16]}" / settings.key()


@DATASETS.register("inkml")
class InkmlDataset(CrohmeDataset):
    """One split of InkML files, read from its rendered cache (rendered on first use)."""

    render_settings = RenderSettings()
    # "crohme": tokens as the 2016/2019 captions; "wap": as the train/2014 captions (hmerzoo.data.latex.tokenize)
    latex_style = "crohme"
    render_jobs: int | None = None  # None: every CPU
    render_progress = True

    @classmethod
    def open_source(cls, root: str | os.PathLike | None, split: str) -> tuple[SplitSource, str]:
        files = split_files(root, split)
        out = cache_dir(root, split, files, cls.render_settings, cls.latex_style)
        if not (out / CAPTION_FILE).is_file():
            try:
                render_files(files, out, cls.render_settings, jobs=cls.render_jobs,
                             progress=cls.render_progress and sys.stderr.isatty(), label=f"render {split}",
                             style=cls.latex_style)
            except DataError:
                if not (out / CAPTION_FILE).is_file():  # another process may have rendered it meanwhile
                    raise
        source = DirSource(out)
        return source, f"{source.describe(CAPTION_FILE)} (rendered from {Path(str(root)) / split})"
