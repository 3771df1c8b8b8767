"""The ``demo`` verb: a page in the browser to draw or drop a formula and read it back as LaTeX."""
from __future__ import annotations

import argparse

from .common import add_decode, import_user_modules


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    import_user_modules(args.imports)
    decode = {k: v for k, v in (("beam_size", args.beam), ("max_len", args.max_len), ("mode", args.mode))
              if v is not None}
    return run_demo(args.model, host=args.host, port=args.port, device=args.device, decode=decode)


def add_parsers(sub) -> None:
    dm = sub.add_parser("demo", help="a web page to draw (mouse, pen, finger) or drop a formula and get its LaTeX")
    dm.add_argument("model", help="run directory or converted model directory")
    dm.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: 127.0.0.1, this computer only; 0.0.0.0 shares it)")
    dm.add_argument("--port", type=int, default=7860, help="port (default: 7860; 0 = any free port)")
    add_decode(dm)
    dm.set_defaults(func=cmd_demo)
