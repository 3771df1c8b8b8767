"""``hmerzoo data``: fetch CROHME, render InkML, build a dictionary, check a data root, show a split."""
from __future__ import annotations

import argparse

from .common import console


def cmd_data_vocab(args: argparse.Namespace) -> int:
    from ..data.check import token_counts, write_dictionary

    counts = token_counts(args.root, args.split or None)
    out = console()
    for token, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        out.print(f"{n:>9}  {token}", markup=False, highlight=False)
    out.print(f"{len(counts)} tokens, {sum(counts.values())} occurrences", markup=False)
    if args.out:
        out.print(f"wrote {write_dictionary(counts, args.out)}", markup=False)
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from ..config import DataConfig, check_section, make_section
    from ..data.check import check_root, check_table
    from ..errors import RecipeError

    data, dictionary = DataConfig(), None
    if args.recipe:
        from ..recipe import load_recipe

        recipe = load_recipe(args.recipe)
        section = dict(recipe.get("data") or {})
        problems = check_section(DataConfig, section, "data")
        if problems:
            raise RecipeError(f"{args.recipe}: " + "; ".join(problems))
        data = make_section(DataConfig, section)
        dictionary = (recipe.get("vocab") or {}).get("dictionary")
    result = check_root(args.root, data, dictionary=args.dictionary or dictionary, splits=args.split or None)
    out = console()
    out.print(check_table(result))
    for problem in result.problems:
        out.print(problem, markup=False, highlight=False, soft_wrap=True)
    verdict = "ok" if result.ok else f"{len(result.problems)} problem(s)"
    out.print(f"{verdict}; samples over the limits are not problems (training drops them)", markup=False)
    return 0 if result.ok else 1


def cmd_data_fetch(args: argparse.Namespace) -> int:
    from ..config import user_data_root
    from ..data.fetch import fetch

    root, digest, verified = fetch(args.dataset, to=args.to, url=args.url, sha256=args.sha256,
                                   progress=not args.quiet)
    note = "verified" if verified else "NOT verified: no checksum is known for this URL (pass --sha256 H)"
    print(f"sha256 {digest} ({note})")
    where = ("found without data.root" if root == user_data_root() else f"use it with data.root={root} or "
             f"HMERZOO_DATA={root}")
    print(f"wrote {root} ({where})")
    return 0


def cmd_data_render(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data.inkml import RenderSettings
    from ..data.inkml_format import folder_files, inkml_splits, render_files, zip_files
    from ..errors import DataError

    source, out = Path(args.inkml_dir).expanduser(), Path(args.out).expanduser()
    settings = RenderSettings(stroke_width=args.stroke_width, symbol_height=args.symbol_height, margin=args.margin)
    if source.is_file() and source.suffix == ".zip":
        jobs = [(str(source), zip_files(source), out)]
    elif source.is_dir() and next(source.glob("*.inkml"), None) is not None:
        jobs = [(str(source), folder_files(source), out)]  # InkML files at the top: one split, written to --out
    elif source.is_dir() and inkml_splits(source):
        jobs = [(str(source / s), folder_files(source / s) if (source / s).is_dir() else zip_files(source / f"{s}.zip"),
                 out / s) for s in inkml_splits(source)]  # one split per folder (or zip) of InkML
    else:
        raise DataError(f"{source}: no .inkml files there (expected a folder of them, a folder of split folders "
                        "holding them, or a zip of them)")
    for where, files, split_out in jobs:
        result = render_files(files, split_out, settings, jobs=args.jobs, progress=not args.quiet,
                              label=f"render {Path(where).name}", style=args.style)
        note = f", {len(result.skipped)} skipped (listed in {split_out / 'skipped.txt'})" if result.skipped else ""
        print(f"{where}: wrote {result.rendered} images and caption.txt to {split_out}{note}")
    return 0


def cmd_data_show(args: argparse.Namespace) -> int:
    from ..data.sheet import contact_sheet, open_for_show

    dataset = open_for_show(args.root, args.split, args.format)
    out = contact_sheet(dataset, args.out, samples=args.samples, columns=args.columns, seed=args.seed)
    bad = dataset.report.count()
    print(f"wrote {out}: {min(args.samples, len(dataset))} of {len(dataset)} samples"
          + (f" ({bad} bad samples left out)" if bad else ""))
    return 0


def add_parsers(sub) -> None:
    data = sub.add_parser("data", help="datasets: fetch CROHME, render InkML, build a dictionary, check or show a "
                                       "data root")
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
    dr = dsub.add_parser("render", help="render InkML files (CROHME truth, MathWriting normalizedLabel) to the "
                                        "CROHME layout: caption.txt + <name>.bmp")
    dr.add_argument("inkml_dir", help="a folder of .inkml files (one split), a folder of split folders, or a zip")
    dr.add_argument("--out", required=True, metavar="DIR", help="where the split (or one folder per split) goes")
    dr.add_argument("--jobs", type=int, default=None, metavar="N", help="processes (default: every CPU)")
    dr.add_argument("--stroke-width", type=float, default=3.5, metavar="PX", help="default 3.5")
    dr.add_argument("--symbol-height", type=float, default=32.0, metavar="PX",
                    help="RMS height of the symbols (default 32)")
    dr.add_argument("--margin", type=int, default=12, metavar="PX", help="default 12")
    dr.add_argument("--style", choices=["crohme", "wap"], default="crohme",
                    help="caption tokens as the CROHME 2016/2019 captions (default) or as WAP's train/2014 ones "
                         "(every \\frac argument braced, no \\limits; docs/data.md)")
    dr.add_argument("--quiet", action="store_true", help="no progress bar")
    dr.set_defaults(func=cmd_data_render)
    ds = dsub.add_parser("show", help="a contact sheet of a split's samples with captions, and histograms of "
                                      "image sizes and caption lengths (needs the plots extra: matplotlib)")
    ds.add_argument("root", help="data root (any data.format)")
    ds.add_argument("--split", default=None, help="default: train, else the first split found")
    ds.add_argument("--out", required=True, metavar="FILE", help="the image to write (.png, .pdf, .svg)")
    ds.add_argument("--samples", "-n", type=int, default=16, metavar="N", help="samples shown (default 16)")
    ds.add_argument("--columns", type=int, default=4, help="default 4")
    ds.add_argument("--seed", type=int, default=0, help="which samples are picked (default 0)")
    ds.add_argument("--format", default="auto", help="data.format of the root (default: detected)")
    ds.set_defaults(func=cmd_data_show)
