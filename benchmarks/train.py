"""Training throughput of a recipe on one fixed, real batch: images/s, step time and peak memory.

    python benchmarks/train.py recipes/bttr.yaml [key.path=value ...] [--data ROOT] [--threads 2]

The batch is one bucket of 8 CROHME training images (train.zip or a train/ folder under --data), bucketed as
training buckets them (sorted by area, packed under data.max_pixels); of the full buckets, the one whose padded
size is closest to 140x482 is used, so every run and every recipe sees the same pixels. After a few warm-up
steps, the timed steps run the trainer's own ``train_step`` (forward, backward, clip, optimizer step) in fp32 on
CPU and bf16 autocast on CUDA.

The baseline is the official CoMER implementation measured the same way: 1.32 images/s for a bucket of 8 at
140x482, fp32, SGD, 2 CPU threads.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402

from hmerzoo.batch import Batch, pad_images  # noqa: E402
from hmerzoo.builder import build_component, build_model  # noqa: E402
from hmerzoo.config import DataConfig, make_section  # noqa: E402
from hmerzoo.errors import HmerzooError  # noqa: E402
from hmerzoo.recipe import load_recipe, validate_recipe  # noqa: E402
from hmerzoo.registry import OPTIMIZERS  # noqa: E402
from hmerzoo.runtime import resolve_device, resolve_precision, seed_everything  # noqa: E402
from hmerzoo.training import train_step  # noqa: E402

BASELINE_IMAGES_PER_S = 1.32  # official CoMER: bucket of 8 at 140x482, fp32, SGD, 2 CPU threads
BASELINE_SHAPE = (140, 482)
BUCKET_SIZE = 8


def default_data_root() -> Path:
    return Path(os.environ.get("HMERZOO_DATA", REPO.parent / "shared" / "data" / "crohme"))


def pick_bucket(root: Path, recipe: dict, target: tuple[int, int], size: int) -> tuple[Batch, list[str]]:
    """The full training bucket (``size`` images) whose padded (height, width) is closest to ``target``."""
    from hmerzoo.builder import vocab_from_recipe
    from hmerzoo.data import CrohmeDataset, make_buckets

    data_cfg = make_section(DataConfig, recipe.get("data"))
    vocab = vocab_from_recipe(recipe)
    dataset = CrohmeDataset(root, data_cfg.train_split, vocab)
    buckets = make_buckets(dataset.sizes, dataset.names, batch_size=size, max_pixels=data_cfg.max_pixels,
                           caption_lengths=dataset.caption_lengths, max_len=data_cfg.max_len,
                           max_image_pixels=data_cfg.max_image_pixels)
    full = [b for b in buckets if len(b) == size]
    if not full:
        raise HmerzooError(f"{root}: no training bucket holds {size} images under data.max_pixels="
                           f"{data_cfg.max_pixels}")

    def padded(bucket: list[int]) -> tuple[int, int]:
        return max(dataset.sizes[i][0] for i in bucket), max(dataset.sizes[i][1] for i in bucket)

    def distance(index: int) -> tuple[float, int]:
        h, w = padded(full[index])
        return abs(h - target[0]) / target[0] + abs(w - target[1]) / target[1], index  # ties: the first bucket

    bucket = full[min(range(len(full)), key=distance)]
    images, mask = pad_images([dataset.load_image(i) for i in bucket])
    names = [dataset.names[i] for i in bucket]
    return Batch(images, mask, [list(dataset.samples[i].ids) for i in bucket], names), names


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # peak resident set size of this process
    return rss / 2**20 if platform.system() == "Darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe path or shipped recipe name")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    parser.add_argument("--data", type=Path, default=None,
                        help="CROHME root with train.zip or train/ (default: $HMERZOO_DATA or ../shared/data/crohme)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (CPU runs; default 2)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="auto", help="auto (fp32 on CPU, bf16 on CUDA) | fp32 | bf16 | fp16")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--markdown", action="store_true", help="also print the result as a markdown table row")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=160)  # a log file: do not squeeze the table into 80 columns
    try:
        root = args.data or default_data_root()
        recipe = load_recipe(args.recipe, [*args.overrides, f"data.root={root}"])
        validate_recipe(recipe, args.recipe)
        device = resolve_device(args.device)
        precision = resolve_precision(args.precision, device)
        if device.type == "cpu":
            torch.set_num_threads(args.threads)
        seed_everything(int(recipe.get("seed") or 7))
        batch, names = pick_bucket(root, recipe, BASELINE_SHAPE, BUCKET_SIZE)
        model = build_model(recipe, validate=False).to(device).train()  # validated just above
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_component(OPTIMIZERS, recipe["optim"], "optim", {"params": params})
        grad_clip = (recipe.get("train") or {}).get("grad_clip")
        scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        batch = batch.to(device)
    except HmerzooError as e:
        console.print(f"[bold red]error:[/] {e}")
        return 2

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(args.warmup):
        train_step(model, batch, optimizer, params, device, precision, grad_clip=grad_clip, scaler=scaler, step=i + 1)
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_seconds = []
    for i in range(args.steps):
        start = time.perf_counter()
        train_step(model, batch, optimizer, params, device, precision, grad_clip=grad_clip, scaler=scaler,
                   step=args.warmup + i + 1)
        synchronize()
        step_seconds.append(time.perf_counter() - start)
    peak = peak_memory_mib(device)

    mean_step = statistics.fmean(step_seconds)
    images_per_s = len(batch) / mean_step
    shape = "x".join(str(d) for d in batch.images.shape)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    ratio = images_per_s / BASELINE_IMAGES_PER_S
    name = recipe.get("name") or Path(args.recipe).stem

    table = Table(title="training throughput", title_justify="left")
    for column in ("recipe", "device", "precision", "batch", "images/s", "step ms (mean, min)", "peak memory",
                   "vs CoMER 1.32 img/s"):
        table.add_column(column, justify="right" if column not in ("recipe", "device", "batch") else "left")
    memory_label = f"{peak:,.0f} MiB " + ("allocated" if device.type == "cuda" else "RSS")
    table.add_row(name, device_name, precision, shape, f"{images_per_s:.2f}",
                  f"{mean_step * 1e3:,.0f}, {min(step_seconds) * 1e3:,.0f}", memory_label, f"{ratio:.2f}x")
    console.print(table)
    console.print(f"{args.warmup} warm-up + {args.steps} timed steps on {len(batch)} images "
                  f"({', '.join(names)}); optimizer {recipe['optim']['type']}; torch {torch.__version__}",
                  markup=False)
    if args.markdown:
        command = "python benchmarks/train.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        print("\n| recipe | device | precision | batch | images/s | step ms | peak memory | vs CoMER (1.32 img/s) |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| {name} | {device_name} | {precision} | {shape} | {images_per_s:.2f} | {mean_step * 1e3:,.0f} | "
              f"{memory_label} | {ratio:.2f}x |")
        print(f"\ncommand: `{command}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
