"""``hmerzoo eval``: ExpRate, ≤1, ≤2, ≤3 of a model on CROHME test splits, with a predictions file.

Every sample of a split is recognised (nothing is dropped: an unreadable image or a caption token outside the
model's vocabulary stops the run with a message naming it). Images are read one by one at their own size (CoMER's
ScaleToLimitRange applied when the model's recipe trained with ``data.scale_to_limit``) and handed to
``model.recognize`` unpadded, in chunks of several ``decode.batch_size`` (so that ``per_image`` batching can put
images of similar size into one search); with ``batching=per_image`` each result is that of the image decoded
alone, so the numbers do not depend on the chunking.

The metric is token edit distance between the predicted and the reference LaTeX token sequences
(:mod:`hmerzoo.metrics`), the reading HMER papers report; it is not the official CROHME ``lgeval`` symbol-level
evaluation. ``summary.json`` says so.

Written into ``--out`` (default ``<MODEL>/eval``, or ``./eval`` when MODEL is a file):

* ``predictions.jsonl``: one object per sample: ``split, name, prediction, truth, distance, score``;
* ``summary.json``: per split ``exprate, le1, le2, le3, count, seconds, images_per_s``, plus the decode settings,
  the model and data paths and the metric's definition.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Sequence

from .config import resolve_data_root
from .data.formats import dataset_class
from .data.loaders import seeded_subset
from .data.sampler import TAG_VAL_LIMIT
from .data.transforms import ScaleToLimitRange
from .errors import HmerzooError
from .metrics import ExpRateMeter
from .predict import decode_settings
from .runtime import inference_settings, resolve_device

METRIC = ("token edit distance: ExpRate, <=1, <=2, <=3 are the fractions of expressions whose predicted LaTeX token "
          "sequence is within 0, 1, 2, 3 token edits (Levenshtein distance over tokens) of the reference; not the "
          "official CROHME lgeval symbol-level metric")
PREDICTIONS_FILE = "predictions.jsonl"
SUMMARY_FILE = "summary.json"
LIMIT_SEED = 0  # --limit takes the same seeded subset every time, so quick runs compare
# images per recognize call (rounded to a multiple of batch_size): enough for per_image batching to find images
# of similar size to search together, few enough for steady progress reports
RECOGNIZE_CHUNK = 64


def default_out_dir(model_path: str | os.PathLike) -> Path:
    """``<MODEL>/eval`` for a run or model directory; ``./eval`` when MODEL is a weights file."""
    path = Path(model_path)
    return path / "eval" if path.is_dir() else Path("eval")


class _Progress:
    """A rich progress bar on a terminal; otherwise a plain line about every 10 % (logs stay readable)."""

    def __init__(self, console: Any, split: str, total: int):
        self.console, self.split, self.total = console, split, total
        self.done = 0
        self.started = time.perf_counter()
        self.next_report = 0
        self.bar = None
        if console.is_terminal:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.bar = Progress(TextColumn(f"[bold]{split}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                console=console, transient=True)
            self.task = self.bar.add_task(split, total=total, rate="")

    def __enter__(self) -> "_Progress":
        if self.bar is not None:
            self.bar.start()
        return self

    def advance(self, n: int) -> None:
        self.done += n
        rate = self.done / max(time.perf_counter() - self.started, 1e-9)
        if self.bar is not None:
            self.bar.update(self.task, advance=n, rate=f"{rate:.1f} img/s")
        elif self.done >= self.next_report or self.done == self.total:
            self.console.print(f"{self.split}: {self.done}/{self.total} images ({rate:.1f} images/s)",
                               markup=False, highlight=False)
            self.next_report = self.done + max(1, self.total // 10)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def evaluate_split(model: Any, data_root: str | os.PathLike, split: str, decode: dict[str, Any],
                   limit: int | None = None, write: Callable[[dict], None] | None = None,
                   console: Any = None) -> dict[str, Any]:
    """Recognise every sample (or a seeded ``limit`` of them) of one split; returns its metrics.

    ``write`` receives each sample's prediction record (what goes into predictions.jsonl).
    """
    # the format detected from the files (data.format=auto); skip_bad=False: a bad sample stops the run
    dataset = dataset_class(data_root)(data_root, split, model.vocab)
    indices = list(range(len(dataset)))
    if limit is not None:
        indices = seeded_subset(len(dataset), limit, LIMIT_SEED, TAG_VAL_LIMIT)
    recipe_data = ((getattr(model, "recipe", None) or {}).get("data")) or {}
    transform = ScaleToLimitRange() if recipe_data.get("scale_to_limit") else None
    batch_size = int(decode["batch_size"])
    chunk_size = batch_size * max(1, RECOGNIZE_CHUNK // batch_size)  # padded batching keeps its batches
    meter = ExpRateMeter()
    started = time.perf_counter()
    with _Progress(console, str(split), len(indices)) as progress:
        for start in range(0, len(indices), chunk_size):
            chunk = indices[start:start + chunk_size]
            images = []
            for i in chunk:
                image = dataset.load_image(i)
                # stays on the CPU: recognize moves each image to the model's device once, after preparing it
                images.append(transform(image) if transform is not None else image)
            recognitions = model.recognize(images, **decode)
            if len(recognitions) != len(chunk):
                raise HmerzooError(f"model.recognize returned {len(recognitions)} results for {len(chunk)} images")
            records = [dataset.samples[i] for i in chunk]
            distances = meter.update([list(r.tokens) for r in recognitions], [rec.ids for rec in records])
            if write is not None:
                for rec, recognition, distance in zip(records, recognitions, distances):
                    write({"split": str(split), "name": rec.name, "prediction": recognition.latex,
                           "truth": model.vocab.to_latex(rec.ids), "distance": distance,
                           "score": float(recognition.score)})
            progress.advance(len(chunk))
    seconds = time.perf_counter() - started
    metrics: dict[str, Any] = dict(meter.compute())
    metrics["seconds"] = round(seconds, 3)
    metrics["images_per_s"] = round(len(indices) / seconds, 3) if seconds > 0 else None
    return metrics


def split_table(split: str, metrics: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(title=f"split {split}", title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label in (("exprate", "ExpRate"), ("le1", "≤1"), ("le2", "≤2"), ("le3", "≤3")):
        table.add_row(label, f"{100 * metrics[key]:.2f} %")
    table.add_row("count", str(metrics["count"]))
    rate = metrics.get("images_per_s")
    table.add_row("images/s", f"{rate:.2f}" if rate is not None else "-")
    return table


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


DEFAULT_SPLITS = ("2014", "2016", "2019")  # the CROHME test years


def run_eval(model_path: str, data_root: str | None = None, splits: Sequence[str] = DEFAULT_SPLITS,
             beam_size: int | None = None,
             out_dir: str | os.PathLike | None = None, limit: int | None = None, batching: str | None = None,
             batch_size: int | None = None, mode: str | None = None, max_len: int | None = None,
             device: str = "auto",
             stdout: IO[str] | None = None, stderr: IO[str] | None = None) -> dict[str, Any]:
    """The ``hmerzoo eval`` command: evaluate, print a table per split, write the two files; returns the summary.

    ``data_root`` None: the default data root (``$HMERZOO_DATA``, the checkout's ``data/crohme``, the user cache).
    """
    from rich.console import Console

    from .builder import load_model

    if limit is not None and limit < 1:
        raise HmerzooError(f"--limit: must be >= 1, got {limit}")
    if not splits:
        raise HmerzooError("--split: give at least one split (e.g. --split 2014 2016 2019)")
    console = Console(file=stdout or sys.stdout, highlight=False)
    progress_console = Console(file=stderr or sys.stderr, highlight=False)
    data_root = resolve_data_root(data_root)  # before the model loads: a missing root fails fast
    torch_device = resolve_device(device, setting="--device")
    model = load_model(model_path, map_location=torch_device)
    decode = decode_settings(model, beam_size=beam_size, batching=batching, batch_size=batch_size, mode=mode,
                             max_len=max_len)
    out = Path(out_dir) if out_dir is not None else default_out_dir(model_path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HmerzooError(f"--out {out}: cannot create the output directory ({e.strerror or e})") from None

    recipe_data = (model.recipe or {}).get("data") or {}
    summary: dict[str, Any] = {
        "metric": METRIC,
        "model": str(Path(model_path).resolve()),
        "data": str(Path(data_root).resolve()),
        "device": str(torch_device),
        "decode": decode,
        "image_transform": "scale_to_limit" if recipe_data.get("scale_to_limit") else "none",
        "limit": limit,
        "splits": {},
    }
    predictions_path = out / PREDICTIONS_FILE
    tmp = predictions_path.with_name(predictions_path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            def write(record: dict) -> None:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

            with inference_settings():  # TF32 matmuls on GPUs that have them
                for split in splits:
                    metrics = evaluate_split(model, data_root, str(split), decode, limit=limit, write=write,
                                             console=progress_console)
                    summary["splits"][str(split)] = metrics
                    console.print(split_table(str(split), metrics))
        os.replace(tmp, predictions_path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written predictions file beside a summary of another run
        raise
    _write_json_atomic(out / SUMMARY_FILE, summary)
    console.print(f"wrote {predictions_path} and {out / SUMMARY_FILE}", markup=False)
    return summary


__all__ = ["DEFAULT_SPLITS", "METRIC", "default_out_dir", "evaluate_split", "run_eval", "split_table"]
