"""How often hmerzoo.data.latex.tokenize reproduces the shipped CROHME captions from the InkML ground truth.

    python tools/measure_latex_tokenizer.py INKML_DIR [--split 2016] [--root data/crohme] [--show N]

INKML_DIR holds the CROHME test InkML of one year (e.g. the CROHME 2016 test set with ground truth); each file's
``truth`` annotation is tokenised and compared with the caption of the same name in ``ROOT``'s split (default: the
split named like the folder, else 2016). Prints the share of exact matches and the lines that differ.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hmerzoo.data.crohme import open_split  # noqa: E402
from hmerzoo.data.inkml import read_inkml  # noqa: E402
from hmerzoo.data.latex import tokenize  # noqa: E402


def captions(root: str, split: str) -> dict[str, list[str]]:
    source, _ = open_split(root, split)
    out = {}
    for line in source.caption().decode("utf-8").splitlines():
        name, _, rest = line.partition("\t")
        if name.strip():
            out[name.strip()] = rest.split()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inkml_dir")
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1] / "data" / "crohme"))
    parser.add_argument("--split", default=None, help="caption split to compare with (default: from the folder)")
    parser.add_argument("--show", type=int, default=50, help="print at most this many differences")
    parser.add_argument("--style", default="crohme", choices=["crohme", "wap"],
                        help="token style: crohme (the 2016/2019 captions), wap (the train/2014 captions)")
    args = parser.parse_args(argv)
    split = args.split or Path(args.inkml_dir).name
    expected = captions(args.root, split)
    files = sorted(Path(args.inkml_dir).glob("*.inkml"))
    compared, same, differ, no_caption = 0, 0, [], 0
    for path in files:
        name = path.stem
        if name not in expected:
            no_caption += 1
            continue
        label = read_inkml(path).label or ""
        got = tokenize(label, style=args.style)
        compared += 1
        if got == expected[name]:
            same += 1
        else:
            differ.append((name, label, " ".join(got), " ".join(expected[name])))
    for name, label, got, want in differ[: args.show]:
        print(f"{name}\n  truth:    {label}\n  tokens:   {got}\n  caption:  {want}")
    missing = len(set(expected) - {p.stem for p in files})
    share = 100.0 * same / compared if compared else 0.0
    print(f"split {split}, style {args.style}: {same}/{compared} captions reproduced exactly ({share:.2f}%); {len(differ)} differ; "
          f"{no_caption} InkML without a caption, {missing} captions without an InkML")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
