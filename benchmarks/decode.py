"""Decoding throughput: the cached beam search against the same search re-running the prefix every step.

    python benchmarks/decode.py [MODEL_DIR] [--images A.png B.png] [--repeat 4] [--threads 2] [--beam 10]

Both variants run ``hmerzoo.decoding.recognize_tensors`` - each image encoded alone, then one batched beam
search over all images, then the rescoring pass - on the same weights and images in one process. The only
difference is the decoder interface the search drives: the decoder's own KV-cached ``init_state`` / ``step`` /
``reorder_state``, or :class:`hmerzoo.decoding.PrefixRecomputingDecoder`, which re-runs the decoder over every
hypothesis's whole prefix at every step with the image memory copied per hypothesis, as the official searches do.
images/s counts everything from image tensors to chosen hypotheses (encoder included). The script checks that both
variants return the same hypotheses (tokens equal, scores within 1e-5) and exits 1 if not.

Default model: the BTTR parity fixture weights (``fixtures/parity/bttr`` under $HMERZOO_SHARED or ../shared),
converted to a temporary directory; default images: the two fixture images, each repeated ``--repeat`` times.
The reference figure is the official CoMER beam search: 0.31 images/s on 2 CPU threads, beam 10, bidirectional.
"""
from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402

OFFICIAL_COMER_IMAGES_PER_S = 0.31  # official CoMER beam search, 2 CPU threads, beam 10, bidirectional
TARGET_IMAGES_PER_S = 6.0
SCORE_TOL = 1e-5


def fixture_dir() -> Path:
    shared = Path(os.environ.get("HMERZOO_SHARED", REPO.parent / "shared"))
    return shared / "fixtures" / "parity" / "bttr"


def load(model_arg: str | None, workdir: Path):
    import hmerzoo
    from hmerzoo.convert import convert

    if model_arg:
        return hmerzoo.load_model(model_arg), model_arg
    weights = fixture_dir() / "state_dict.safetensors"
    if not weights.is_file():
        raise SystemExit(f"no model directory given and the BTTR fixture weights are not at {weights} "
                         "(set HMERZOO_SHARED or pass a model directory)")
    return hmerzoo.load_model(convert("bttr", weights, workdir / "bttr")), f"converted {weights}"


def default_images() -> list[Path]:
    d = fixture_dir()
    return sorted(d.glob("image*.png"))


def differences(a, b) -> list[str]:
    """Where two lists of search results disagree (empty: identical within SCORE_TOL)."""
    problems = []
    for i, (x, y) in enumerate(zip(a, b)):
        if [h.tokens for h in x.hypotheses] != [h.tokens for h in y.hypotheses]:
            problems.append(f"image {i}: different hypotheses")
            continue
        for kind in ("search_score", "score"):
            gap = max(abs(getattr(h, kind) - getattr(g, kind)) for h, g in zip(x.hypotheses, y.hypotheses))
            if gap > SCORE_TOL:
                problems.append(f"image {i}: {kind} differs by {gap:.2e}")
        if x.best.tokens != y.best.tokens:
            problems.append(f"image {i}: different best hypothesis")
    if len(a) != len(b):
        problems.append(f"{len(a)} vs {len(b)} results")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None,
                        help="model directory (default: the BTTR fixture weights, converted)")
    parser.add_argument("--images", nargs="+", type=Path, default=None, help="images (default: the fixture images)")
    parser.add_argument("--repeat", type=int, default=4, help="each image this many times (default 4)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--beam", type=int, default=10, help="beam size (default 10)")
    parser.add_argument("--mode", default="bttr", help="decode mode (default bttr: bidirectional + rescoring)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="images per search (default: all of them, in one search)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per variant; the median counts")
    parser.add_argument("--markdown", action="store_true", help="also print the result as markdown table rows")
    args = parser.parse_args(argv)

    from rich.console import Console
    from rich.table import Table

    from hmerzoo.decoding import PrefixRecomputingDecoder, decode_config, recognize_tensors
    from hmerzoo.decoding.recognize import image_tensors

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=160)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, source = load(args.model, Path(tmp))
    model.eval()
    paths = args.images or default_images()
    if not paths:
        raise SystemExit("no images: pass --images")
    tensors = image_tensors([str(p) for p in paths], model.recipe) * args.repeat
    config = decode_config(model.recipe, beam_size=args.beam, mode=args.mode,
                           batch_size=args.batch_size or len(tensors))
    variants = {"KV cache (hmerzoo)": None, "re-run the prefix (official)": PrefixRecomputingDecoder(model.decoder)}

    recognize_tensors(model, tensors[:2], config)  # warm-up: allocator, oneDNN kernels
    timings: dict[str, list[float]] = {}
    outputs = {}
    for name, stepper in variants.items():
        seconds = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            outputs[name] = recognize_tensors(model, tensors, config, stepper=stepper)
            seconds.append(time.perf_counter() - start)
        timings[name] = seconds
    problems = differences(*outputs.values())

    n = len(tensors)
    rates = {name: n / statistics.median(s) for name, s in timings.items()}
    cached, rerun = rates.values()
    table = Table(title=f"beam search, {config.mode} mode, beam {config.beam_size}, {n} images, up to "
                        f"{config.batch_size} per search, {torch.get_num_threads()} CPU threads", title_justify="left")
    for column in ("search", "images/s", "s per round (median, min)", "vs official CoMER 0.31 img/s"):
        table.add_column(column, justify="left" if column == "search" else "right")
    for name, seconds in timings.items():
        table.add_row(name, f"{rates[name]:.2f}", f"{statistics.median(seconds):.2f}, {min(seconds):.2f}",
                      f"{rates[name] / OFFICIAL_COMER_IMAGES_PER_S:.1f}x")
    console.print(table)
    console.print(f"cached / re-run the prefix: {cached / rerun:.2f}x; target {TARGET_IMAGES_PER_S} images/s: "
                  f"{'met' if cached >= TARGET_IMAGES_PER_S else 'NOT met'}", markup=False)
    console.print(f"model: {source}; images: {', '.join(p.name for p in paths)} x {args.repeat}; "
                  f"torch {torch.__version__}", markup=False)
    if args.markdown:
        command = "python benchmarks/decode.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        print("\n| search | images/s | s per round (median, min) | vs official CoMER (0.31 img/s) |")
        print("|---|---|---|---|")
        for name, seconds in timings.items():
            print(f"| {name} | {rates[name]:.2f} | {statistics.median(seconds):.2f}, {min(seconds):.2f} | "
                  f"{rates[name] / OFFICIAL_COMER_IMAGES_PER_S:.1f}x |")
        print(f"\ncommand: `{command}`")
    if problems:
        console.print("[bold red]outputs differ:[/] " + "; ".join(problems))
        return 1
    console.print("outputs identical: every hypothesis's tokens equal, scores within 1e-5", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
