"""The ``hmerzoo`` command line: train, list, config, convert.

Every error hmerzoo raises on purpose prints as one message and exits with status 2; ``--debug`` shows the
traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .errors import HmerzooError

LIST_KINDS = ["encoders", "necks", "decoders", "heads", "losses", "optimizers", "schedulers", "datasets",
              "transforms", "recipes"]


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


def _split_overrides(items: Sequence[str]) -> list[str]:
    bad = [s for s in items if "=" not in s and not s.startswith("~")]
    if bad:
        raise HmerzooError(f"'{bad[0]}' is not an override; overrides are key.path=value (e.g. train.max_steps=30) "
                           "or ~key.path to delete a key")
    return list(items)


def _import(mods: Sequence[str] | None) -> None:
    from .registry import import_modules

    import_modules(list(mods or []), key_path="--import")


# --- commands -------------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from .recipe import load_recipe, validate_recipe
    from .trainer import train

    _import(args.imports)
    recipe = load_recipe(args.recipe, _split_overrides(args.overrides))
    recipe.setdefault("imports", [])
    recipe["imports"] = list(dict.fromkeys(list(recipe["imports"] or []) + list(args.imports or [])))
    validate_recipe(recipe, args.recipe)
    train(recipe, resume=args.resume)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from . import components  # noqa: F401
    from .recipe import list_recipes
    from .registry import ALL

    _import(args.imports)
    kinds = [args.kind] if args.kind else LIST_KINDS
    console = _console()
    for kind in kinds:
        table = Table(title=kind, title_justify="left")
        table.add_column("name", style="bold")
        if kind == "recipes":
            table.add_column("path")
            table.add_column("description")
            for path in list_recipes():
                table.add_row(path.stem, str(path), _recipe_summary(path))
        else:
            table.add_column("class")
            table.add_column("summary")
            for name, obj in ALL[kind].items():
                doc = (obj.__doc__ or "").strip().splitlines()
                table.add_row(name, f"{obj.__module__}.{obj.__qualname__}", doc[0] if doc else "")
        console.print(table)
    return 0


def _recipe_summary(path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def cmd_config(args: argparse.Namespace) -> int:
    from .recipe import dump_recipe, load_recipe, validate_recipe

    _import(args.imports)
    recipe = load_recipe(args.recipe, _split_overrides(args.overrides))
    validate_recipe(recipe, args.recipe)
    if args.action == "show":
        print(dump_recipe(recipe), end="")
    else:
        print(f"{args.recipe}: valid")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import CONVERTERS, convert

    out = convert(args.model, args.official, args.out, dictionary=args.dictionary)
    print(f"wrote {out} (load it with hmerzoo.load_model('{out}'))")
    return 0


# --- parser ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hmerzoo", description="Handwritten Mathematical Expression Recognition zoo")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    def add_import(sp):
        sp.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (registers your own components); repeatable")

    t = sub.add_parser("train", help="train a model from a recipe")
    t.add_argument("recipe", help="recipe path or shipped recipe name (see 'hmerzoo list recipes')")
    t.add_argument("overrides", nargs="*", help="key.path=value overrides (value parsed as YAML)")
    t.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="'auto': continue from the run directory's latest checkpoint; or a checkpoint path")
    add_import(t)
    t.set_defaults(func=cmd_train)

    ls = sub.add_parser("list", help="list registered components and shipped recipes")
    ls.add_argument("kind", nargs="?", choices=LIST_KINDS)
    add_import(ls)
    ls.set_defaults(func=cmd_list)

    c = sub.add_parser("config", help="show or validate a resolved recipe")
    c.add_argument("action", choices=["show", "validate"])
    c.add_argument("recipe")
    c.add_argument("overrides", nargs="*")
    add_import(c)
    c.set_defaults(func=cmd_config)

    cv = sub.add_parser("convert", help="convert an official checkpoint into a hmerzoo model directory")
    cv.add_argument("model", help="which official implementation the checkpoint comes from (e.g. bttr)")
    cv.add_argument("official", help="official checkpoint (.ckpt / .pkl / .safetensors with the official keys)")
    cv.add_argument("--out", required=True, help="output directory (load it with hmerzoo.load_model)")
    cv.add_argument("--dictionary", default=None, help="the model's dictionary.txt (default: the one beside it)")
    cv.set_defaults(func=cmd_convert)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except HmerzooError as e:
        if args.debug:
            raise
        from rich.markup import escape

        _console().print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
