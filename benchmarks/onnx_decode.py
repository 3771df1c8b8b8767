"""ONNX Runtime against PyTorch: recognition time on the CPU for the same search over the same weights.

    python benchmarks/onnx_decode.py [--models bttr comer hmer_mtl abm] [--threads 1] [--repeats 2]

Models: the parity fixture weights ($HMERZOO_SHARED/fixtures/parity/<model>, default ../shared), converted with
``hmerzoo convert`` and exported with ``hmerzoo.export.export_onnx`` into a temporary directory. Each backend
recognises the two fixture images with the recipe's decode settings (ABM: ``max_len`` 200, its untrained-length
hypotheses otherwise run to 1000), ``--threads`` threads for torch and for onnxruntime alike; the two backends
alternate ``--repeats`` times and the best time of each is printed, with whether they returned the same tokens.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import hmerzoo  # noqa: E402
from hmerzoo.convert import convert  # noqa: E402
from hmerzoo.export import export_onnx, load_onnx_model  # noqa: E402

EXTRA = {"abm": {"max_len": 200}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bttr", "comer", "hmer_mtl", "abm"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shared = Path(os.environ.get("HMERZOO_SHARED", REPO.parent / "shared")) / "fixtures" / "parity"
    print("| model | mode, beam | PyTorch s | ONNX Runtime s | ORT / PyTorch | same tokens |")
    print("|---|---|---:|---:|---:|---|")
    status = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = hmerzoo.load_model(convert(name, shared / name / "state_dict.safetensors", Path(tmp) / name))
            onnx_model = load_onnx_model(export_onnx(model, Path(tmp) / f"{name}_onnx"), threads=args.threads)
            images = sorted((shared / name).glob("image*.png"))
            decode = EXTRA.get(name, {})
            for m in (model, onnx_model):  # warm-up: first-call allocations and graph initialisation
                m.recognize(images[1:], beam_size=2, max_len=5)
            best = {"torch": float("inf"), "onnxruntime": float("inf")}
            tokens = {}
            for _ in range(args.repeats):
                for label, m in (("torch", model), ("onnxruntime", onnx_model)):
                    start = time.perf_counter()
                    found = m.recognize(images, **decode)
                    best[label] = min(best[label], time.perf_counter() - start)
                    tokens[label] = [r.tokens for r in found]
            same = tokens["torch"] == tokens["onnxruntime"]
            status |= not same
            settings = {**(model.recipe.get("decode") or {}), **decode}
            print(f"| {name} | {settings.get('mode')}, {settings.get('beam_size')} | {best['torch']:.2f} | "
                  f"{best['onnxruntime']:.2f} | {best['onnxruntime'] / best['torch']:.2f} | {same} |", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
