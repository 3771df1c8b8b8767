"""``hmerzoo data show``: a contact sheet of a split (samples with their captions) and its size/length histograms.

Drawn with matplotlib's object API (a ``Figure`` on the Agg canvas, no pyplot): nothing global changes in the
caller's process. matplotlib comes with the ``plots`` extra (``pip install 'hmerzoo[plots]'``).
"""
from __future__ import annotations

import os
import random
import textwrap
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..vocab import DEFAULT_SPECIALS, Vocabulary
from .crohme import CrohmeDataset
from .formats import dataset_class, open_format_split, splits_of

PLOTS_HINT = "pip install 'hmerzoo[plots]' (matplotlib)"


def open_for_show(root: str | os.PathLike, split: str | None, format: str = "auto") -> CrohmeDataset:
    """A split of any format, readable without a dictionary (its own tokens make the vocabulary)."""
    found = splits_of(root, format)
    if not found:
        raise DataError(f"data root '{root}': no splits found")
    split = str(split) if split is not None else ("train" if "train" in found else found[0])
    source, where = open_format_split(root, split, format)
    tokens: set[str] = set()
    for line in source.caption().decode("utf-8", errors="replace").splitlines():
        name, tab, caption = line.partition("\t")
        tokens.update(source.tokens(caption if tab else line.strip().partition(" ")[2]))
    vocab = Vocabulary(list(DEFAULT_SPECIALS) + sorted(tokens - set(DEFAULT_SPECIALS)))
    return dataset_class(root, format)(root, split, vocab, skip_bad=True)


def contact_sheet(dataset: CrohmeDataset, out: str | os.PathLike, samples: int = 16, columns: int = 4,
                  seed: int = 0, title: str | None = None) -> Path:
    """Writes ``out`` (png, pdf, svg: by its suffix): ``samples`` seeded-random samples with their captions, then
    histograms of image heights, widths and caption lengths over the whole split."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise DataError(f"hmerzoo data show draws with matplotlib, which is not installed: {PLOTS_HINT}") from None

    count = min(samples, len(dataset))
    chosen = sorted(random.Random(seed).sample(range(len(dataset)), count))
    rows = max(1, -(-count // columns))
    figure = Figure(figsize=(4 * columns, 2.2 * rows + 3.2), layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(rows + 1, columns, height_ratios=[2.2] * rows + [3.0])
    for k, index in enumerate(chosen):
        axes = figure.add_subplot(grid[k // columns, k % columns])
        sample = dataset[index]
        axes.imshow(sample.image[0].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        caption = " ".join(dataset.vocab.decode(sample.ids))
        text = textwrap.shorten(caption, width=110, placeholder=" ...")
        axes.set_title(f"{sample.name}  {tuple(sample.image.shape[1:])}\n" + "\n".join(textwrap.wrap(text, 40)),
                       fontsize=7, loc="left", parse_math=False)
        axes.set_xticks([])
        axes.set_yticks([])
    sizes = np.asarray(dataset.sizes)
    lengths = np.asarray(dataset.caption_lengths)
    bottom = grid[rows, :].subgridspec(1, 3)
    for j, (values, label) in enumerate(((sizes[:, 0], "image height (px)"), (sizes[:, 1], "image width (px)"),
                                          (lengths, "caption length (tokens)"))):
        axes = figure.add_subplot(bottom[0, j])
        axes.hist(values, bins=min(40, max(5, len(values) // 5)), color="#4c72b0")
        median = float(np.median(values))
        axes.axvline(median, color="#c44e52", linewidth=1)
        axes.set_xlabel(f"{label}: median {median:g}, max {values.max()}", fontsize=8)
        axes.tick_params(labelsize=7)
    figure.suptitle(title or f"{dataset.caption_where}: {len(dataset)} samples ({count} shown)", fontsize=9,
                    parse_math=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    return out
