"""What the verbs of the command line share: the console, override and ``--import`` handling, decode options."""
from __future__ import annotations

import argparse
from typing import Sequence

from ..errors import HmerzooError


def console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def split_overrides(items: Sequence[str]) -> list[str]:
    bad = [s for s in items if "=" not in s and not s.startswith("~")]
    if bad:
        raise HmerzooError(f"'{bad[0]}' is not an override; overrides are key.path=value (e.g. train.max_steps=30) "
                           "or ~key.path to delete a key")
    return list(items)


def import_user_modules(mods: Sequence[str] | None) -> None:
    from ..registry import import_modules

    import_modules(list(mods or []), key_path="--import")


def add_import(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="import MODULE first (registers your own components); repeatable")


def add_decode(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--beam", type=int, default=None, metavar="N",
                    help="beam size (default: the model recipe's decode.beam_size; 1 = greedy)")
    sp.add_argument("--max-len", type=int, default=None, metavar="N",
                    help="longest LaTeX token sequence produced (default: the recipe's decode.max_len)")
    sp.add_argument("--mode", default=None,
                    help="search mode, e.g. l2r, r2l, bttr, comer (default: the recipe's decode.mode)")
    sp.add_argument("--device", default="auto", metavar="auto|cpu|cuda",
                    help="where the model runs (default: auto = CUDA when available)")
    add_import(sp)
