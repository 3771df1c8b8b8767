"""The README's main job on the real CROHME zips: train a few steps from the shipped recipe, then --resume auto."""
import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bttr_trains_on_crohme_zips_and_resumes(tmp_path, crohme_root):
    def run(*extra):
        cmd = [sys.executable, "-m", "hmerzoo", "train", "bttr", f"data.root={crohme_root}", "train.log_every=1",
               "data.num_workers=0", *extra]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    first = run("train.max_steps=3")
    assert "6,375,425 trainable parameters" in first
    assert "8333 training and 500 validation samples" in first  # 8,835 - 500 held out - 2 over max_image_pixels
    ckpts = sorted(p.name for p in (tmp_path / "runs" / "bttr" / "checkpoints").iterdir())
    assert ckpts == ["step-00000003.safetensors", "step-00000003.trainer.pt"]
    run("train.max_steps=5", "--resume", "auto")
    lines = [json.loads(l) for l in (tmp_path / "runs" / "bttr" / "metrics.jsonl").read_text().splitlines()]
    steps = [l["step"] for l in lines if "loss" in l]
    assert steps == [1, 2, 3, 4, 5]
    assert all(l["loss"] > 0 and l["grad_norm"] > 0 for l in lines if "loss" in l)
    # the first steps of a fresh model on 113 classes start near ln(113) = 4.73
    assert 3.0 < lines[0]["loss"] < 6.5
