#!/usr/bin/env bash
# One-command GPU check (issue 14): for every shipped recipe, training throughput in bf16 eager and with
# torch.compile (images/s, peak memory, host syncs per step), a 2-GPU DDP step when two GPUs are visible, and batched
# beam search over the first 100 CROHME-2014 images; one markdown table at the end (and in --out).
#
#   benchmarks/gpu_check.sh [--cpu] [--steps N] [--images N] [--out FILE] [--data ROOT] [RECIPE ...]
#
# --cpu: a smoke run on the CPU with tiny models (2 steps, 4 images, fp32, compile with the eager backend), to check
# the script end to end without a GPU. Decoding uses the parity fixture weights ($HMERZOO_SHARED/fixtures/parity,
# default ../shared) when present, else the untrained model with decode.max_len 50 (the table says which).
# PYTHON overrides the interpreter (default: python).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-python}"
SCRIPT="$(mktemp "${TMPDIR:-/tmp}/hmerzoo_gpu_check.XXXXXX.py")"
trap 'rm -f "$SCRIPT"' EXIT
cat > "$SCRIPT" <<'PYTHON'
"""The body of benchmarks/gpu_check.sh (see there)."""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import sys
import time
from pathlib import Path

BENCH = Path(os.environ["HMERZOO_BENCH_DIR"])
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))

import torch  # noqa: E402

import syncs  # noqa: E402  benchmarks/syncs.py
from hmerzoo.builder import build_component, build_model  # noqa: E402
from hmerzoo.recipe import load_recipe  # noqa: E402
from hmerzoo.registry import OPTIMIZERS  # noqa: E402
from hmerzoo.runtime import runtime_settings, seed_everything  # noqa: E402


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if platform.system() == "Darwin" else rss / 2**10


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_and_batch(name: str, args, device: torch.device):
    seed_everything(0)
    if args.cpu:
        model, recipe = syncs.tiny_model(name, args.data)
        batch = syncs.small_batch(args.data, recipe, 2)
    else:
        import train as bench_train  # benchmarks/train.py: the 8-image bucket closest to 140x482

        recipe = load_recipe(name, [f"data.root={args.data}"])
        model = build_model(recipe, validate=False)
        batch, _ = bench_train.pick_bucket(args.data, recipe, bench_train.BASELINE_SHAPE, bench_train.BUCKET_SIZE)
    return model.to(device), recipe, batch.to(device)


def train_run(name: str, args, device: torch.device, precision: str, compile_backend: str | None) -> dict:
    from hmerzoo.training import compile_model, train_step

    model, recipe, batch = model_and_batch(name, args, device)
    if compile_backend:
        compile_model(model, compile_backend)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_component(OPTIMIZERS, recipe["optim"], "optim", {"params": params})
    clip = (recipe.get("train") or {}).get("grad_clip")
    warmup = 1 if args.cpu else 3
    start = time.perf_counter()
    for i in range(warmup):
        train_step(model, batch, optimizer, params, device, precision, grad_clip=clip, step=i + 1)
    sync(device)
    first = time.perf_counter() - start
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # syncs counted in the eager run only: the compiler would trace the counting mode itself
    counted = syncs.Counter()
    with counted if not compile_backend else contextlib.nullcontext():
        train_step(model, batch, optimizer, params, device, precision, grad_clip=clip, step=warmup + 1)
    start = time.perf_counter()
    for i in range(args.steps):
        train_step(model, batch, optimizer, params, device, precision, grad_clip=clip, step=warmup + 2 + i)
    sync(device)
    seconds = time.perf_counter() - start
    return {"images/s": len(batch) * args.steps / seconds, "peak MiB": peak_mib(device), "syncs": counted.total,
            "warm-up s": first, "shape": "x".join(map(str, batch.images.shape))}


def decode_run(name: str, args, device: torch.device) -> dict:
    from hmerzoo.data.crohme import CrohmeDataset
    from hmerzoo.decoding.recognize import decode_config, recognize_tensors

    weights = Path(os.environ.get("HMERZOO_SHARED", BENCH.parent.parent / "shared")) / "fixtures" / "parity" / name
    overrides = {}
    if not args.cpu and (weights / "state_dict.safetensors").is_file():
        import tempfile

        import hmerzoo
        from hmerzoo.convert import convert

        model = hmerzoo.load_model(convert(name, weights / "state_dict.safetensors",
                                           Path(tempfile.mkdtemp()) / name), map_location=device)
        recipe, source = model.recipe, "fixture weights"
    else:
        model, recipe, _ = model_and_batch(name, args, device)
        overrides = {"max_len": 8, "beam_size": 3} if args.cpu else {"max_len": 50}
        source = "untrained, " + ", ".join(f"{k} {v}" for k, v in overrides.items())
    model.eval()
    dataset = CrohmeDataset(args.data, "2014", model.vocab)
    images = [dataset.load_image(i) for i in range(min(args.images, len(dataset)))]
    if (recipe.get("data") or {}).get("scale_to_limit"):
        from hmerzoo.data.transforms import ScaleToLimitRange

        scale = ScaleToLimitRange()
        images = [scale(image) for image in images]
    config = decode_config(recipe, batching="per_image", batch_size=8, **overrides)
    steps = syncs.counting_steps(model.decoder)
    sync(device)
    start = time.perf_counter()
    with syncs.Counter() as counted:  # fp32 (TF32 on GPUs), as hmerzoo eval decodes
        recognize_tensors(model, images, config)
    sync(device)
    seconds = time.perf_counter() - start
    return {"decode images/s": len(images) / seconds, "decode syncs/step": counted.total / max(steps(), 1),
            "decode": f"{len(images)} images, {config.mode}, batch 8, {source}"}


def ddp_step(args) -> None:
    """Under torchrun: one DDP training step of each recipe on every rank; rank 0 prints a markdown line."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from hmerzoo.training import train_step

    dist.init_process_group("nccl")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    for name in args.recipes:
        model, recipe, batch = model_and_batch(name, args, device)
        model = DistributedDataParallel(model.train(), find_unused_parameters=False)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_component(OPTIMIZERS, recipe["optim"], "optim", {"params": params})
        times = []
        for i in range(3):
            start = time.perf_counter()
            train_step(model, batch, optimizer, params, device, "bf16", step=i + 1)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        if rank == 0:
            print(f"| {name} | 2-GPU DDP | ok | {times[-1] * 1e3:.0f} ms/step (after 2 warm-up) |", flush=True)
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipes", nargs="*")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.md"))
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--ddp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.recipes, skipped = syncs.decoding_recipes(args.recipes or syncs.shipped_recipes())
    if skipped:  # their throughput: hmerzoo train <recipe> train.max_steps=N, read off metrics.jsonl
        print(f"gpu_check: not measured here (no decoder): {', '.join(skipped)}", flush=True)
    args.data = args.data or syncs.default_data_root()
    args.steps = args.steps or (2 if args.cpu else 20)
    args.images = args.images or (4 if args.cpu else 100)
    if args.ddp:
        ddp_step(args)
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (use --cpu for the smoke run)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    precision = "fp32" if args.cpu else "bf16"
    backend = "eager" if args.cpu else "inductor"
    where = f"CPU, {torch.get_num_threads()} threads" if args.cpu else torch.cuda.get_device_name(device)
    lines = [f"gpu_check on {where}, torch {torch.__version__}, {precision}, {args.steps} timed steps, "
             f"compile backend {backend}", "",
             "| recipe | batch | images/s eager | images/s compiled | peak MiB (eager, compiled) | syncs/train step "
             "| compile warm-up s | decode images/s | decode syncs/step | decode |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    with runtime_settings():  # TF32 as training sets it
        for name in args.recipes:
            eager = train_run(name, args, device, precision, None)
            compiled = train_run(name, args, device, precision, backend)
            decoded = decode_run(name, args, device)
            lines.append(f"| {name} | {eager['shape']} | {eager['images/s']:.1f} | {compiled['images/s']:.1f} | "
                         f"{eager['peak MiB']:,.0f}, {compiled['peak MiB']:,.0f} | {eager['syncs']} | "
                         f"{compiled['warm-up s']:.0f} | {decoded['decode images/s']:.2f} | "
                         f"{decoded['decode syncs/step']:.1f} | {decoded['decode']} |")
            print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
PYTHON
export HMERZOO_BENCH_DIR="$HERE"
export PYTHONPATH="$(dirname "$HERE")${PYTHONPATH:+:$PYTHONPATH}"
"$PY" "$SCRIPT" "$@"
# the DDP step, only with two GPUs and without --cpu; its lines are appended to the table file
if [[ " $* " != *" --cpu "* ]] && [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  OUT="gpu_check.md"
  ARGS=("$@")
  for i in "${!ARGS[@]}"; do [ "${ARGS[$i]}" = "--out" ] && OUT="${ARGS[$((i + 1))]}"; done
  { echo; echo "| recipe | run | status | step time |"; echo "|---|---|---|---|"; } | tee -a "$OUT"
  CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0,1}" "$PY" -m torch.distributed.run --standalone \
    --nproc_per_node=2 "$SCRIPT" --ddp "$@" | tee -a "$OUT"
fi
