"""GPU readiness (issue 14) checked on the CPU: TF32 matmul precision for training and inference."""
from __future__ import annotations

import torch

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
