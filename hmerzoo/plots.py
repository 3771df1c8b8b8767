"""``hmerzoo plot``: training curves of one or more runs from their ``metrics.jsonl``.

Three panels sharing the step axis: the training loss (the lines that carry ``loss``), the validation ExpRate
(``val/exprate``, written after each validation) and the learning rate (``lr``). Each run is one colour, the same in
every panel, so runs compare at a glance. matplotlib is an optional dependency (``pip install -e ".[plots]"``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .errors import DataError, HmerzooError

METRICS_FILE = "metrics.jsonl"  # what hmerzoo.training.output writes in every run directory

# (panel title, key in metrics.jsonl, y-axis label)
PANELS = (("training loss", "loss", "loss"), ("validation ExpRate", "val/exprate", "ExpRate"),
          ("learning rate", "lr", "lr"))


@dataclass
class RunCurves:
    """One run's curves: per metrics key, the (step, value) points in file order (null values left out)."""

    name: str
    points: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def read_metrics(run: str | Path, name: str | None = None) -> RunCurves:
    """The curves of a run directory (or a metrics.jsonl file itself). Lines cut short by a crash are skipped."""
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise DataError(f"{run}: no {METRICS_FILE} (give a run directory that hmerzoo train wrote, or the file)")
    curves = RunCurves(name=name or (path.parent.name if path.name == METRICS_FILE else path.stem))
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        step = record.get("step")
        if not isinstance(step, int):
            continue
        for _, key, _ in PANELS:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                curves.points.setdefault(key, []).append((step, float(value)))
    if not curves.points:
        raise DataError(f"{path}: no loss, val/exprate or lr values to plot")
    return curves


def require_matplotlib() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or an error saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise HmerzooError('plotting needs matplotlib, which is not installed: pip install "hmerzoo[plots]" '
                           '(or pip install "matplotlib>=3.7")') from None
    matplotlib.use("Agg")  # no display needed; plots only go to files
    import matplotlib.pyplot as plt

    return plt


def plot_runs(runs: Sequence[RunCurves], title: str | None = None) -> Any:
    """A matplotlib Figure with the three panels; one line per run in each panel where the run has that key."""
    plt = require_matplotlib()
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 9), sharex=True, constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        for ax, (_, key, _) in zip(axes, PANELS):
            points = run.points.get(key)
            if not points:
                continue
            steps, values = zip(*points)
            # validation comes once per epoch: markers keep a few points readable
            ax.plot(steps, values, color=color, label=run.name, marker="o" if key.startswith("val/") else None,
                    markersize=3)
    for ax, (panel, key, label) in zip(axes, PANELS):
        ax.set_title(panel, fontsize=10)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "lr" and ax.lines:
            # runs compared often differ by orders of magnitude in lr (Adadelta 1.0, AdamW 1e-3): log scale
            if min(float(min(line.get_ydata())) for line in ax.lines) > 0:
                ax.set_yscale("log")
            else:
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if not ax.lines:
            ax.text(0.5, 0.5, f"no {key} in any run", transform=ax.transAxes, ha="center", va="center",
                    color="gray")
    axes[-1].set_xlabel("step")
    if any(ax.lines for ax in axes):
        axes[0].legend(loc="upper right", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def run_plot(runs: Sequence[str], out: str | Path, names: Sequence[str] | None = None,
             title: str | None = None) -> Path:
    """The ``hmerzoo plot`` command: read every run, draw them on one figure, save it (format from the suffix)."""
    if names and len(names) != len(runs):
        raise HmerzooError(f"--name given {len(names)} times for {len(runs)} runs")
    curves = [read_metrics(run, names[i] if names else None) for i, run in enumerate(runs)]
    fig = plot_runs(curves, title=title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    require_matplotlib().close(fig)
    return out
