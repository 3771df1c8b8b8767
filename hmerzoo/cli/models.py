"""Verbs that work on a trained or converted model: ``eval``, ``predict``, ``convert``."""
from __future__ import annotations

import argparse

from .common import add_decode, import_user_modules


def cmd_convert(args: argparse.Namespace) -> int:
    from ..convert import convert

    out = convert(args.model, args.official, args.out, dictionary=args.dictionary)
    print(f"wrote {out} (load it with hmerzoo.load_model('{out}'))")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..evaluate import run_eval

    import_user_modules(args.imports)
    run_eval(args.model, args.data, args.split, beam_size=args.beam, out_dir=args.out, limit=args.limit,
             batching=args.batching, batch_size=args.batch_size, mode=args.mode, max_len=args.max_len,
             device=args.device)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from ..predict import run_predict

    import_user_modules(args.imports)
    return run_predict(args.model, args.images, directory=args.dir, beam_size=args.beam, as_json=args.json,
                       device=args.device, mode=args.mode, max_len=args.max_len, attention=args.attention,
                       backend=args.backend)


def add_parsers(sub) -> None:
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
    pr.add_argument("--attention", default=None, metavar="DIR",
                    help="also write attention pictures into DIR: one PNG per output token and strip.png "
                         "(DIR/<image name>/ when several images are given)")
    pr.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch",
                    help="torch: MODEL is a run or model directory; onnxruntime: MODEL is a directory written by "
                         "'hmerzoo export --format onnx' (needs the [onnx] extra)")
    add_decode(pr)
    pr.set_defaults(func=cmd_predict)

    cv = sub.add_parser("convert", help="convert an official checkpoint into a hmerzoo model directory")
    cv.add_argument("model", help="which official implementation the checkpoint comes from: bttr, comer, hmer_mtl, "
                                  "abm, ical, tamer, posformer ('hmerzoo list converters')")
    cv.add_argument("official", help="official checkpoint (.ckpt / .pkl / .safetensors with the official keys)")
    cv.add_argument("--out", required=True, help="output directory (load it with hmerzoo.load_model)")
    cv.add_argument("--dictionary", default=None, help="the model's dictionary.txt (default: the one beside it)")
    cv.set_defaults(func=cmd_convert)
