"""Verbs that show a model or a run to people: ``plot`` (training curves) and ``export`` (ONNX graphs)."""
from __future__ import annotations

import argparse

from .common import add_import, import_user_modules


def cmd_plot(args: argparse.Namespace) -> int:
    from ..plots import run_plot

    out = run_plot(args.runs, args.out, names=args.name or None, title=args.title)
    print(f"wrote {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..builder import load_model
    from ..export import export_onnx, require_onnx
    import_user_modules(args.imports)
    require_onnx()  # before loading the model: a missing extra fails fast
    model = load_model(args.model, map_location="cpu")
    out = export_onnx(model, args.out)
    print(f"wrote {out} (run it with: hmerzoo predict {out} IMAGE --backend onnxruntime)")
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

    ex = sub.add_parser("export", help="write a model as ONNX graphs (encoder, decoder init and step) for onnxruntime")
    ex.add_argument("model", help="run directory or converted model directory")
    ex.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default: onnx)")
    ex.add_argument("--out", required=True, metavar="DIR", help="directory to write the graphs and settings into")
    add_import(ex)
    ex.set_defaults(func=cmd_export)
