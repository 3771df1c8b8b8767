"""GPU readiness (issue 14) checked on the CPU: TF32 matmul precision for training and inference, and
train.compile covering every shipped recipe's decoder."""
from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest
import torch

from benchmark_modules import load_benchmark
from hmerzoo import evaluate, predict
from hmerzoo.runtime import inference_settings, runtime_settings


def test_training_settings_use_tf32_unless_deterministic():
    before = torch.get_float32_matmul_precision()
    with runtime_settings(deterministic=False):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before
    with runtime_settings(deterministic=True):
        assert torch.get_float32_matmul_precision() == "highest"
    assert torch.get_float32_matmul_precision() == before
    with inference_settings():
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before


def test_eval_and_predict_decode_under_tf32(monkeypatch, tmp_path):
    """The decoding of ``hmerzoo eval`` and ``hmerzoo predict`` runs with the precision set (and restored)."""
    import hmerzoo.builder

    class Model:
        recipe: dict = {}

    seen = {}
    monkeypatch.setattr(hmerzoo.builder, "load_model", lambda *a, **k: Model())

    def fake_split(model, root, split, decode, **kwargs):
        seen["eval"] = torch.get_float32_matmul_precision()
        return {"exprate": 0.0, "n": 0}

    monkeypatch.setattr(evaluate, "resolve_data_root", lambda root: tmp_path)
    monkeypatch.setattr(evaluate, "decode_settings", lambda model, **k: {})
    monkeypatch.setattr(evaluate, "evaluate_split", fake_split)
    monkeypatch.setattr(evaluate, "split_table", lambda split, metrics: split)
    evaluate.run_eval("m", splits=["2014"], out_dir=tmp_path / "out", device="cpu")

    def fake_files(model, paths, decode):
        seen["predict"] = torch.get_float32_matmul_precision()
        return iter(())

    monkeypatch.setattr(predict, "collect_images", lambda images, directory: list(images))
    monkeypatch.setattr(predict, "decode_settings", lambda model, **k: {})
    monkeypatch.setattr(predict, "predict_files", fake_files)
    assert predict.run_predict("m", ["x.png"], device="cpu") == 0
    assert seen == {"eval": "high", "predict": "high"}
    assert torch.get_float32_matmul_precision() == "highest"


# --- train.compile covers every shipped recipe's training forward ----------------------------------------------
def compiled_training_forward(name: str, root: Path) -> tuple[dict[str, int], int, list[str]]:
    """Compile a tiny model of recipe ``name`` as train.compile does (each target with a graph-counting eager
    backend), run one training forward and backward; -> (graphs per compiled module, graph breaks, break reasons)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from hmerzoo.training import compile_targets

    syncs = load_benchmark("syncs")
    torch.manual_seed(0)
    model, recipe = syncs.tiny_model(name, root)
    batch = syncs.small_batch(root, recipe, 3)
    names = {id(m): n for n, m in model.named_modules()}
    graphs: dict[str, int] = collections.Counter()

    def counting(module_name: str):
        def backend(gm, example_inputs):
            graphs[module_name] += 1
            return gm.forward
        return backend

    torch._dynamo.reset()
    counters.clear()
    for target in compile_targets(model):
        target.compile(backend=counting(names[id(target)]), dynamic=True)
    try:
        model.train()
        model(batch)["loss"].backward()
    finally:
        torch._dynamo.reset()
    reasons = sorted(counters["graph_break"])
    return dict(graphs), sum(counters["graph_break"].values()), reasons


# recipes whose training forward compiles without a graph break: all of them, since the ARM's masked BatchNorm
# takes its statistics from masked sums instead of a boolean index (7 breaks before, torch 2.14)
# every shipped recipe with a decoder (the caption-less Mask & Match stages have none)
COMPILED = ["abm", "bttr", "can", "comer", "comer_count", "comer_implicit_skeleton", "comer_implicit_tree", "hmer_mtl",
            "ical", "mask_match", "posformer", "tamer"]
NO_BREAKS = set(COMPILED)


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILED)
def test_compile_covers_the_decoder(name, sample_root):
    graphs, breaks, reasons = compiled_training_forward(name, sample_root)
    print(name, graphs, breaks, reasons)
    decoder_graphs = sum(n for module, n in graphs.items() if module.startswith("decoder."))
    assert graphs.get("encoder", 0) >= 1 and decoder_graphs >= 1, graphs
    if name == "abm":
        # each branch's step is one graph for all of the caption's steps: no per-step or per-length compile
        assert graphs["decoder.l2r"] == 1 and graphs["decoder.r2l"] == 1, graphs
    if name in NO_BREAKS:
        assert breaks == 0, reasons


# --- benchmarks/gpu_check.sh --cpu runs to completion ------------------------------------------------------------
@pytest.mark.slow
def test_gpu_check_cpu_smoke(sample_root, tmp_path):
    """The smoke path of the GPU check on one recipe: the script finishes and writes its table."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path / "check.md"
    run = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_check.sh"), "--cpu", "--data", str(sample_root),
                          "--out", str(out), "bttr"], env={**os.environ, "PYTHON": sys.executable},
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| bttr ")]
    assert len(rows) == 1, out.read_text()
    cells = [c.strip() for c in rows[0]]
    assert float(cells[2]) > 0 and float(cells[3]) > 0  # images/s eager, compiled
    assert int(cells[5]) >= 1  # the logging read of train_step at least
    assert "4 images, bttr" in cells[9]
