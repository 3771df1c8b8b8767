"""Size buckets, as ``data_iterator`` in BTTR/CoMER's datamodule builds them.

Samples are sorted by image area and packed greedily: a bucket grows while (largest area in it) x (count) stays
within ``max_pixels`` and count within ``batch_size``. Buckets are built once; an epoch only shuffles their order.
"""
from __future__ import annotations

from typing import Sequence

from .report import DataReport

REASON_TOO_LONG = "caption longer than data.max_len"
REASON_TOO_BIG = "image larger than data.max_image_pixels"


def make_buckets(sizes: Sequence[tuple[int, int]], names: Sequence[str], batch_size: int, max_pixels: int,
                 caption_lengths: Sequence[int] | None = None, max_len: int | None = None,
                 max_image_pixels: int | None = None, report: DataReport | None = None,
                 split: str = "", wheres: Sequence[str] | None = None) -> list[list[int]]:
    """Group sample indices into buckets.

    ``sizes`` are (height, width) per sample. Sorting is stable by (area, name), so the result does not depend on
    the order the samples were read in. Training passes ``max_len`` / ``max_image_pixels``: longer captions and
    larger images are dropped and counted in ``report`` (BTTR/CoMER print and drop them). Evaluation passes
    neither and loses nothing: an image larger than ``max_pixels`` gets a bucket of its own.
    """
    if batch_size < 1:
        raise ValueError(f"make_buckets: batch_size must be >= 1, got {batch_size}")
    if max_pixels < 1:
        raise ValueError(f"make_buckets: max_pixels must be >= 1, got {max_pixels}")
    areas = [h * w for h, w in sizes]
    order = sorted(range(len(sizes)), key=lambda i: (areas[i], names[i]))

    buckets: list[list[int]] = []
    current: list[int] = []
    biggest = 0
    for i in order:
        where = wheres[i] if wheres is not None else names[i]
        if max_len is not None and caption_lengths is not None and caption_lengths[i] > max_len:
            if report is not None:
                report.add(split, REASON_TOO_LONG, f"{where}: {caption_lengths[i]} tokens > {max_len}", filtered=True)
            continue
        if max_image_pixels is not None and areas[i] > max_image_pixels:
            if report is not None:
                h, w = sizes[i]
                report.add(split, REASON_TOO_BIG, f"{where}: {h}x{w} = {areas[i]} pixels > {max_image_pixels}",
                           filtered=True)
            continue
        candidate_biggest = max(biggest, areas[i])
        if current and (candidate_biggest * (len(current) + 1) > max_pixels or len(current) == batch_size):
            buckets.append(current)
            current, candidate_biggest = [], areas[i]
        current.append(i)
        biggest = candidate_biggest
    if current:
        buckets.append(current)
    return buckets
