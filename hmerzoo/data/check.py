"""``hmerzoo data vocab`` and ``hmerzoo data check``: a data root's token counts and dictionary, and a full check
of every split (every image decodes, every token is in the dictionary, no empty or duplicate captions, sizes and
lengths against a recipe's limits).

Both read the caption files line by line themselves, rather than through :class:`CrohmeDataset`, so that every
problem is reported with its file and line and none stops the scan.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from pathlib import Path
from typing import Iterator

from ..config import DICTIONARY_FILE, DataConfig, resolve_data_root
from ..errors import DataError
from ..vocab import DEFAULT_SPECIALS, Vocabulary
from .crohme import CAPTION_FILE, IMAGE_EXTENSIONS, SplitSource
from .formats import detect_format, open_format_split, splits_of
from .images import read_image_bytes
from .inkml_format import InkmlDataset, label_counts


@dataclasses.dataclass
class CaptionLine:
    split: str
    where: str  # "<caption file>:<line>"
    name: str
    tokens: list[str]
    malformed: bool = False  # no tab between name and caption


def _splits(root: str | os.PathLike, splits: list[str] | None, format: str = "auto") -> list[str]:
    found = splits_of(root, format)
    if not Path(root).exists():
        raise DataError(f"data root '{root}' does not exist")
    if not found:
        raise DataError(f"data root '{root}': no splits found (<split>/{CAPTION_FILE} folders or <split>.zip files, "
                        "<split>_images/ + <split>_labels.txt, <split>/labels.tsv, or <split>/*.inkml)")
    if splits:
        missing = [s for s in splits if s not in found]
        if missing:
            raise DataError(f"data root '{root}': no split {', '.join(missing)} (found: {', '.join(found)})")
        return list(splits)
    return found


def caption_lines(source: SplitSource, where: str, split: str) -> Iterator[CaptionLine]:
    """Every non-blank line of a split's caption file, numbered from 1."""
    text = source.caption().decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        name, tab, caption = line.partition("\t")
        if not tab:  # WAP-style files separate with spaces; take the first field as the name
            name, _, caption = line.strip().partition(" ")
        yield CaptionLine(split, f"{where}:{number}", name.strip(), source.tokens(caption), malformed=not tab)


def token_counts(root: str | os.PathLike, splits: list[str] | None = None,
                 format: str = "auto") -> collections.Counter:
    """How often each caption token occurs over the given splits (default: all of them)."""
    counts: collections.Counter = collections.Counter()
    chosen = _splits(root, splits, format)
    if (format if format != "auto" else detect_format(root)) == "inkml":  # labels only: nothing is rendered
        return collections.Counter(label_counts(root, InkmlDataset.latex_style, chosen))
    for split in chosen:
        source, where = open_format_split(root, split, format)
        for line in caption_lines(source, where, split):
            counts.update(line.tokens)
    return counts


# formats whose roots come without a dictionary: their vocabulary can be read off the labels
LABEL_VOCABULARY_FORMATS = ("hme100k", "folder", "inkml")


def labels_vocabulary(recipe: dict) -> Vocabulary | None:
    """The vocabulary of a recipe's data root read off its labels, where the recipe names no dictionary and the
    root (an HME100K, folder or InkML root) has no ``dictionary.txt``; None otherwise (the dictionary decides).

    The tokens of every split, sorted, after ``vocab.specials``: the ids depend on the root's labels, not on which
    splits a run reads. The trained model keeps its vocabulary, so evaluation needs no dictionary either.
    """
    vocab_cfg, data_cfg = recipe.get("vocab") or {}, recipe.get("data") or {}
    if vocab_cfg.get("dictionary") is not None or data_cfg.get("dataset") is not None:
        return None
    root = resolve_data_root(data_cfg.get("root"))
    if not Path(root).is_dir() or (Path(root) / DICTIONARY_FILE).is_file():
        return None
    fmt = data_cfg.get("format") or "auto"
    try:
        fmt = detect_format(root) if fmt == "auto" else fmt
    except DataError:
        return None  # the dataset reports the ambiguity (or the missing data) where it is opened
    if fmt not in LABEL_VOCABULARY_FORMATS:
        return None
    specials = vocab_cfg.get("specials")
    specials = list(DEFAULT_SPECIALS if specials is None else specials)
    # (InkML labels are read without rendering: MathWriting's synthetic split alone is 400k files)
    tokens = [t for t in sorted(token_counts(root, format=fmt)) if t not in specials]
    return Vocabulary(specials + tokens, roles=vocab_cfg.get("roles"))


def write_dictionary(counts: collections.Counter, out: str | os.PathLike) -> Path:
    """One token per line, sorted (a stable order: the ids of a model trained with it do not depend on counts)."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(f"{token}\n" for token in sorted(counts)), encoding="utf-8")
    os.replace(tmp, out)
    return out


@dataclasses.dataclass
class SplitStats:
    samples: int = 0
    bad_images: int = 0
    missing_images: int = 0
    unknown_tokens: int = 0
    empty: int = 0
    duplicates: int = 0
    malformed: int = 0
    too_big: int = 0  # beyond data.max_image_pixels (dropped from training, not a fault)
    too_long: int = 0  # beyond data.max_len (dropped from training, not a fault)

    PROBLEMS = ("bad_images", "missing_images", "unknown_tokens", "empty", "duplicates", "malformed")

    @property
    def problems(self) -> int:
        return sum(getattr(self, k) for k in self.PROBLEMS)


@dataclasses.dataclass
class CheckResult:
    root: str
    dictionary: str | None
    stats: dict[str, SplitStats]
    problems: list[str]  # "<file>:<line>: <what>"
    limits: dict[str, int]

    @property
    def ok(self) -> bool:
        return not self.problems


def _find_image(source: SplitSource, name: str) -> str | None:
    if name.lower().endswith(IMAGE_EXTENSIONS) and source.has(name):  # HME100K / labels.tsv names carry it
        return name
    for ext in IMAGE_EXTENSIONS:
        if source.has(name + ext):
            return name + ext
    return None


def check_root(root: str | os.PathLike, data: DataConfig | None = None, dictionary: str | os.PathLike | None = None,
               splits: list[str] | None = None) -> CheckResult:
    """Check every sample of every split (or of ``splits``) of ``root``. ``data`` gives the limits
    (``max_image_pixels``, ``max_len``; default: the recipe defaults); ``dictionary`` defaults to the root's."""
    data = data or DataConfig()
    problems: list[str] = []
    dictionary = Path(dictionary) if dictionary is not None else Path(root) / DICTIONARY_FILE
    known: set[str] | None = None
    if dictionary.is_file():
        # the dictionary's own tokens (either file format), without the special tokens a model adds
        known = set(Vocabulary.from_dictionary(str(dictionary)).tokens[len(DEFAULT_SPECIALS):])
    else:
        problems.append(f"{dictionary}: no dictionary (write one with `hmerzoo data vocab {root} --out {dictionary}`)")
    stats: dict[str, SplitStats] = {}
    for split in _splits(root, splits):
        source, where = open_format_split(root, split)
        st = stats[split] = SplitStats()
        seen: dict[str, str] = {}
        for line in caption_lines(source, where, split):
            st.samples += 1
            if line.malformed:
                st.malformed += 1
                problems.append(f"{line.where}: no tab between the name and the caption")
            if line.name in seen:
                st.duplicates += 1
                problems.append(f"{line.where}: duplicate name '{line.name}' (first at {seen[line.name]})")
            else:
                seen[line.name] = line.where
            if not line.tokens:
                st.empty += 1
                problems.append(f"{line.where}: empty caption for '{line.name}'")
            unknown = sorted({t for t in line.tokens if known is not None and t not in known})
            if unknown:
                st.unknown_tokens += 1
                problems.append(f"{line.where}: token(s) not in {dictionary.name}: {' '.join(unknown)}")
            if len(line.tokens) > data.max_len:
                st.too_long += 1
            filename = _find_image(source, line.name)
            if filename is None:
                st.missing_images += 1
                problems.append(f"{line.where}: no image '{line.name}' ({'/'.join(IMAGE_EXTENSIONS)}) in {where}")
                continue
            try:
                pixels = read_image_bytes(source.read(filename), source.describe(filename))
            except (DataError, OSError) as e:
                st.bad_images += 1
                problems.append(f"{line.where}: image does not decode: {e}")
                continue
            if pixels.shape[0] * pixels.shape[1] > data.max_image_pixels:
                st.too_big += 1
    return CheckResult(str(root), str(dictionary) if known is not None else None, stats, problems,
                       {"max_image_pixels": data.max_image_pixels, "max_len": data.max_len})


def check_table(result: CheckResult):
    """The summary as a rich table: one row per split, problems first, then what training would drop."""
    from rich.table import Table

    table = Table(title=f"hmerzoo data check {result.root}",
                  caption=f"problems: bad = image does not decode, missing = no image file, oov = caption with "
                          f"tokens not in the dictionary, notab = malformed line; counted only: big = over "
                          f"{result.limits['max_image_pixels']} px, long = over {result.limits['max_len']} tokens")
    columns = [("samples", "samples"), ("bad", "bad_images"), ("missing", "missing_images"),
               ("oov", "unknown_tokens"), ("empty", "empty"), ("dup", "duplicates"), ("notab", "malformed"),
               ("big", "too_big"), ("long", "too_long")]
    table.add_column("split")
    for title, _ in columns:
        table.add_column(title, justify="right")
    for split, st in result.stats.items():
        table.add_row(split, *(str(getattr(st, key)) for _, key in columns))
    return table


__all__ = ["CaptionLine", "CheckResult", "SplitStats", "caption_lines", "check_root", "check_table", "token_counts",
           "write_dictionary"]
