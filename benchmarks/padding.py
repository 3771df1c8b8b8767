"""What ``data.pad_multiple`` costs: extra padded pixels per epoch on the CROHME training split.

    python benchmarks/padding.py [--data ROOT] [--recipe bttr] [--multiples 1 8 16 32]

The training buckets are built as training builds them (the recipe's data.batch_size, max_pixels,
max_image_pixels, max_len; no augmentation); each bucket is padded to its largest height and width, rounded up to
the multiple. Printed per multiple: the pixels the encoder sees over one epoch, relative to the real image pixels and
to multiple 1, and how many distinct padded shapes the buckets have (each a new cuDNN algorithm search, compiled
graph or allocator block size on a GPU). Reads only the image headers.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from hmerzoo.builder import vocab_from_recipe  # noqa: E402
from hmerzoo.config import DataConfig, make_section  # noqa: E402
from hmerzoo.data import CrohmeDataset, make_buckets  # noqa: E402
from hmerzoo.recipe import load_recipe  # noqa: E402


def round_up(size: int, multiple: int) -> int:
    return -(-size // multiple) * multiple


def padding_table(sizes: list[tuple[int, int]], buckets: list[list[int]], multiples: list[int]) -> list[dict]:
    """Per multiple: padded pixels of all buckets, their ratio to the real pixels and to multiple 1, shapes."""
    real = sum(sizes[i][0] * sizes[i][1] for bucket in buckets for i in bucket)
    rows = []
    for multiple in multiples:
        padded, shapes = 0, set()
        for bucket in buckets:
            h = round_up(max(sizes[i][0] for i in bucket), multiple)
            w = round_up(max(sizes[i][1] for i in bucket), multiple)
            padded += len(bucket) * h * w
            shapes.add((len(bucket), h, w))
        rows.append({"multiple": multiple, "padded": padded, "real": real, "shapes": len(shapes),
                     "spatial": len({(h, w) for _, h, w in shapes})})
    base = rows[0]["padded"]
    for row in rows:
        row["vs_real"] = row["padded"] / real - 1
        row["vs_first"] = row["padded"] / base - 1
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="CROHME root (default: $HMERZOO_DATA or data/crohme)")
    parser.add_argument("--recipe", default="bttr", help="the recipe whose data section builds the buckets")
    parser.add_argument("--split", default="train")
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 8, 16, 32])
    args = parser.parse_args(argv)
    root = args.data or Path(os.environ.get("HMERZOO_DATA") or REPO / "data" / "crohme")
    recipe = load_recipe(args.recipe, [f"data.root={root}"])
    cfg = make_section(DataConfig, recipe.get("data"))
    dataset = CrohmeDataset(root, args.split, vocab_from_recipe(recipe))
    buckets = make_buckets(dataset.sizes, dataset.names, batch_size=cfg.batch_size, max_pixels=cfg.max_pixels,
                           caption_lengths=[len(s.ids) for s in dataset.samples], max_len=cfg.max_len,
                           max_image_pixels=cfg.max_image_pixels)
    rows = padding_table(list(dataset.sizes), buckets, sorted(set([1] + args.multiples)))
    print(f"{root}/{args.split}: {sum(map(len, buckets))} images in {len(buckets)} buckets (recipe {args.recipe}: "
          f"batch_size {cfg.batch_size}, max_pixels {cfg.max_pixels})\n")
    print("| pad_multiple | padded pixels / epoch | over the images' own | over pad_multiple 1 | bucket shapes "
          "| distinct H x W |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['multiple']} | {r['padded']:,} | {100 * r['vs_real']:+.1f}% | {100 * r['vs_first']:+.1f}% "
              f"| {r['shapes']} | {r['spatial']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
