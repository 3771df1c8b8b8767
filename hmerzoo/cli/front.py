"""Verbs that show a model or a run to people: ``plot`` (training curves) and ``export`` (ONNX graphs)."""
from __future__ import annotations

import argparse


def cmd_plot(args: argparse.Namespace) -> int:
    from ..plots import run_plot

    out = run_plot(args.runs, args.out, names=args.name or None, title=args.title)
    print(f"wrote {out}")
    return 0


def add_parsers(sub) -> None:
    pl = sub.add_parser("plot", help="training loss, validation ExpRate and learning rate of runs, on one figure")
    pl.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or metrics.jsonl files) to compare")
    pl.add_argument("--out", default="curves.png", metavar="FILE",
                    help="image to write; the suffix picks the format (png, svg, pdf; default: curves.png)")
    pl.add_argument("--name", action="append", default=[], metavar="NAME",
                    help="legend name of each run, in order (default: the run directory's name); repeatable")
    pl.add_argument("--title", default=None, help="figure title")
    pl.set_defaults(func=cmd_plot)
