"""The ``hmerzoo`` command line: train, eval, predict, list, config, convert, data.

Every error hmerzoo raises on purpose (a :class:`HmerzooError`), and an operating-system error on a file, prints as
one message and exits with status 2; ``--debug`` shows the traceback instead. Any other exception is a bug: it
prints its traceback and exits with status 1 (docs/errors.md). ``predict`` exits with 1 when some images could not
be read (the others are still printed).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from .errors import HmerzooError

LIST_KINDS = ["encoders", "necks", "decoders", "heads", "losses", "optimizers", "schedulers", "datasets",
              "transforms", "converters", "search_modes", "recipes"]


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
    from .training import train

    _import(args.imports)
    recipe = load_recipe(args.recipe, _split_overrides(args.overrides))
    recipe.setdefault("imports", [])
    recipe["imports"] = list(dict.fromkeys(list(recipe["imports"] or []) + list(args.imports or [])))
    if args.nproc_per_node is not None:
        from .distributed import ENV_RELAUNCHED, relaunch_with_torchrun

        if not os.environ.get(ENV_RELAUNCHED):  # the relaunched processes themselves just train
            validate_recipe(recipe, args.recipe)  # a bad recipe fails here, before N processes start
            # The same command line without the flag, in N processes started by torch.distributed.run.
            argv = args.argv if args.argv is not None else sys.argv[1:]
            return relaunch_with_torchrun(args.nproc_per_node, argv)
    train(recipe, resume=args.resume, source=args.recipe)  # validates the recipe (once)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from rich.table import Table

    from . import components, convert  # noqa: F401  (importing them registers the built-in entries)
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
    from .convert import convert

    out = convert(args.model, args.official, args.out, dictionary=args.dictionary)
    print(f"wrote {out} (load it with hmerzoo.load_model('{out}'))")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import run_eval

    _import(args.imports)
    run_eval(args.model, args.data, args.split, beam_size=args.beam, out_dir=args.out, limit=args.limit,
             batching=args.batching, batch_size=args.batch_size, mode=args.mode, max_len=args.max_len,
             device=args.device)
    return 0


def cmd_data_vocab(args: argparse.Namespace) -> int:
    from .data.check import token_counts, write_dictionary

    counts = token_counts(args.root, args.split or None)
    console = _console()
    for token, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        console.print(f"{n:>9}  {token}", markup=False, highlight=False)
    console.print(f"{len(counts)} tokens, {sum(counts.values())} occurrences", markup=False)
    if args.out:
        console.print(f"wrote {write_dictionary(counts, args.out)}", markup=False)
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from .config import DataConfig, check_section, make_section
    from .data.check import check_root, check_table
    from .errors import RecipeError

    data, dictionary = DataConfig(), None
    if args.recipe:
        from .recipe import load_recipe

        recipe = load_recipe(args.recipe)
        section = dict(recipe.get("data") or {})
        problems = check_section(DataConfig, section, "data")
        if problems:
            raise RecipeError(f"{args.recipe}: " + "; ".join(problems))
        data = make_section(DataConfig, section)
        dictionary = (recipe.get("vocab") or {}).get("dictionary")
    result = check_root(args.root, data, dictionary=args.dictionary or dictionary, splits=args.split or None)
    console = _console()
    console.print(check_table(result))
    for problem in result.problems:
        console.print(problem, markup=False, highlight=False, soft_wrap=True)
    verdict = "ok" if result.ok else f"{len(result.problems)} problem(s)"
    console.print(f"{verdict}; samples over the limits are not problems (training drops them)", markup=False)
    return 0 if result.ok else 1


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from .data.fetch import fetch

    root, digest, verified = fetch(args.dataset, to=args.to, url=args.url, sha256=args.sha256,
                                   progress=not args.quiet)
    note = "verified" if verified else "NOT verified: no checksum is known for this URL (pass --sha256 H)"
    print(f"sha256 {digest} ({note})")
    from .config import user_data_root

    where = ("found without data.root" if root == user_data_root() else f"use it with data.root={root} or "
             f"HMERZOO_DATA={root}")
    print(f"wrote {root} ({where})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import run_predict

    _import(args.imports)
    return run_predict(args.model, args.images, directory=args.dir, beam_size=args.beam, as_json=args.json,
                       device=args.device, mode=args.mode, max_len=args.max_len)


# --- parser ---------------------------------------------------------------------------------------------------
class IntermixedParser(argparse.ArgumentParser):
    """A verb's parser: options and positionals may come in any order (``train RECIPE --resume auto key=value``),
    as argparse's intermixed parsing allows. Plain argparse takes all positionals in one go, so overrides after an
    option would be "unrecognized arguments"."""

    _intermixed_active = False

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        # parse_known_intermixed_args calls back in here for its two passes; a parser with its own sub-commands
        # (`hmerzoo data ...`) cannot be intermixed and leaves it to them
        if self._intermixed_active or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._intermixed_active = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed_active = False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hmerzoo", description="Handwritten Mathematical Expression Recognition zoo")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    sub = p.add_subparsers(dest="command", required=True, parser_class=IntermixedParser)

    def add_import(sp):
        sp.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (registers your own components); repeatable")

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

    def add_decode(sp):
        sp.add_argument("--beam", type=int, default=None, metavar="N",
                        help="beam size (default: the model recipe's decode.beam_size; 1 = greedy)")
        sp.add_argument("--max-len", type=int, default=None, metavar="N",
                        help="longest LaTeX token sequence produced (default: the recipe's decode.max_len)")
        sp.add_argument("--mode", default=None,
                        help="search mode, e.g. l2r, r2l, bttr, comer (default: the recipe's decode.mode)")
        sp.add_argument("--device", default="auto", metavar="auto|cpu|cuda",
                        help="where the model runs (default: auto = CUDA when available)")
        add_import(sp)

    ev = sub.add_parser("eval", help="ExpRate, <=1, <=2, <=3 of a model on CROHME test splits")
    ev.add_argument("model", help="run directory or converted model directory")
    ev.add_argument("--data", default=None, metavar="ROOT",
                    help="data root: <split>/ folders or <split>.zip files (the BTTR/CoMER layout); default: "
                         "$HMERZOO_DATA, the checkout's data/crohme, then ~/.cache/hmerzoo/datasets/crohme")
    ev.add_argument("--split", nargs="+", default=["2014", "2016", "2019"], metavar="SPLIT",
                    help="splits to evaluate (default: 2014 2016 2019)")
    ev.add_argument("--out", default=None, metavar="DIR",
                    help="where predictions.jsonl and summary.json go (default: MODEL/eval, or ./eval)")
    ev.add_argument("--limit", type=int, default=None, metavar="N",
                    help="evaluate a seeded subset of N samples per split (quick checks)")
    ev.add_argument("--batching", choices=["per_image", "padded"], default=None,
                    help="per_image: each image decoded alone (results independent of batching); padded: "
                         "images padded into batches like the official CoMER evaluation (default: the recipe's)")
    ev.add_argument("--batch-size", type=int, default=None, metavar="N",
                    help="images handed to the decoder at a time (default: the recipe's decode.batch_size)")
    add_decode(ev)
    ev.set_defaults(func=cmd_eval)

    pr = sub.add_parser("predict", help="LaTeX for image files (black-on-white photos and odd sizes are handled)")
    pr.add_argument("model", help="run directory or converted model directory")
    pr.add_argument("images", nargs="*", metavar="IMAGE", help="image files (png, jpg, bmp, tif)")
    pr.add_argument("--dir", default=None, metavar="DIR", help="also every image file in DIR, sorted by name")
    pr.add_argument("--json", action="store_true",
                    help="one JSON object per line: image, latex, tokens, score (or image, error)")
    add_decode(pr)
    pr.set_defaults(func=cmd_predict)

    cv = sub.add_parser("convert", help="convert an official checkpoint into a hmerzoo model directory")
    cv.add_argument("model", help="which official implementation the checkpoint comes from: bttr, comer, hmer_mtl, "
                                  "abm ('hmerzoo list converters')")
    cv.add_argument("official", help="official checkpoint (.ckpt / .pkl / .safetensors with the official keys)")
    cv.add_argument("--out", required=True, help="output directory (load it with hmerzoo.load_model)")
    cv.add_argument("--dictionary", default=None, help="the model's dictionary.txt (default: the one beside it)")
    cv.set_defaults(func=cmd_convert)

    data = sub.add_parser("data", help="datasets: fetch CROHME, build a dictionary, check a data root")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=argparse.ArgumentParser)
    dv = dsub.add_parser("vocab", help="token counts of a data root's captions, and a dictionary from them")
    dv.add_argument("root", help="data root (<split>/ folders or <split>.zip files)")
    dv.add_argument("--split", nargs="+", default=None, metavar="SPLIT", help="only these splits (default: all)")
    dv.add_argument("--out", default=None, metavar="FILE", help="write the dictionary (one token per line) here")
    dv.set_defaults(func=cmd_data_vocab)
    dc = dsub.add_parser("check", help="check every sample of a data root; exit status 1 when problems are found")
    dc.add_argument("root", help="data root (<split>/ folders or <split>.zip files)")
    dc.add_argument("--recipe", default=None, metavar="R",
                    help="take the size and length limits (data.max_image_pixels, data.max_len) and "
                         "vocab.dictionary from this recipe")
    dc.add_argument("--dictionary", default=None, metavar="FILE", help="default: ROOT/dictionary.txt")
    dc.add_argument("--split", nargs="+", default=None, metavar="SPLIT", help="only these splits (default: all)")
    dc.set_defaults(func=cmd_data_check)
    df = dsub.add_parser("fetch", help="download a dataset and unpack it as a data root")
    df.add_argument("dataset", choices=["crohme"])
    df.add_argument("--to", default=None, metavar="DIR",
                    help="where the data root goes (default: $HMERZOO_HOME/datasets/crohme, "
                         "~/.cache/hmerzoo/datasets/crohme), found then without data.root")
    df.add_argument("--url", default=None, help="download from here instead (http(s)://, file:// or a path)")
    df.add_argument("--sha256", default=None, metavar="H", help="the archive's expected sha256")
    df.add_argument("--quiet", action="store_true", help="no progress bar")
    df.set_defaults(func=cmd_data_fetch)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # train --nproc-per-node relaunches this command line
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
    except OSError as e:
        # The operating system refused a file (missing, not permitted, disk full): the message names it and why.
        if args.debug:
            raise
        from rich.markup import escape

        what = f"{e.filename}: {e.strerror}" if e.filename is not None and e.strerror else str(e)
        _console().print(f"[bold red]error:[/] {escape(what)} (--debug shows where)", soft_wrap=True)
        return 2
    except Exception as e:
        # Anything else is a bug (in hmerzoo or in a component it ran): the traceback is what a report needs.
        if args.debug:
            raise
        import traceback

        traceback.print_exc()
        print(f"error: unexpected {type(e).__name__}: this is a bug in hmerzoo or in a component it ran, not a "
              "problem with your input; please report it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
