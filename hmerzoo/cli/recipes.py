"""Verbs that work on recipes: ``train``, ``list``, ``config``."""
from __future__ import annotations

import argparse
import os
import sys

from .common import add_import, console, import_user_modules, split_overrides

LIST_KINDS = ["encoders", "necks", "decoders", "heads", "losses", "optimizers", "schedulers", "datasets",
              "transforms", "converters", "search_modes", "models", "recipes"]


def cmd_train(args: argparse.Namespace) -> int:
    from ..recipe import load_recipe, validate_recipe
    from ..training import train

    import_user_modules(args.imports)
    recipe = load_recipe(args.recipe, split_overrides(args.overrides))
    recipe.setdefault("imports", [])
    recipe["imports"] = list(dict.fromkeys(list(recipe["imports"] or []) + list(args.imports or [])))
    if args.nproc_per_node is not None:
        from ..distributed import ENV_RELAUNCHED, relaunch_with_torchrun

        if not os.environ.get(ENV_RELAUNCHED):  # the relaunched processes themselves just train
            validate_recipe(recipe, args.recipe)  # a bad recipe fails here, before N processes start
            # The same command line without the flag, in N processes started by torch.distributed.run.
            argv = args.argv if args.argv is not None else sys.argv[1:]
            return relaunch_with_torchrun(args.nproc_per_node, argv)
    train(recipe, resume=args.resume, source=args.recipe)  # validates the recipe (once)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .. import components, convert  # noqa: F401  (importing them registers the built-in entries)
    from ..recipe import list_recipes
    from ..registry import ALL

    import_user_modules(args.imports)
    kinds = [args.kind] if args.kind else LIST_KINDS
    out = console()
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
        out.print(table)
    return 0


def _recipe_summary(path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def cmd_config(args: argparse.Namespace) -> int:
    from ..recipe import dump_recipe, load_recipe, validate_recipe

    import_user_modules(args.imports)
    recipe = load_recipe(args.recipe, split_overrides(args.overrides))
    validate_recipe(recipe, args.recipe)
    if args.action == "show":
        print(dump_recipe(recipe), end="")
    else:
        print(f"{args.recipe}: valid")
    return 0


def add_parsers(sub) -> None:
    t = sub.add_parser("train", help="train a model from a recipe")
    t.add_argument("recipe", help="recipe path or shipped recipe name (see 'hmerzoo list recipes')")
    t.add_argument("overrides", nargs="*", help="key.path=value overrides (value parsed as YAML)")
    t.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="'auto': continue from the run directory's latest checkpoint; or a checkpoint path")
    t.add_argument("--nproc-per-node", "--nproc_per_node", dest="nproc_per_node", default=None, metavar="N",
                   help="train in N processes on this machine (one per GPU; gloo on CPU) with DDP: relaunches "
                        "this command through torch.distributed.run (torchrun); for several machines run "
                        "'torchrun ... -m hmerzoo train ...' yourself")
    add_import(t)
    t.set_defaults(func=cmd_train, argv=None)

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
