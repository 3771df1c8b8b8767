"""Mask & Match's three stages through `hmerzoo train`'s loop on a few synthetic images with tiny sizes: exact
resume in the middle of stage 2 (masking curriculum and frozen encoder included) and, as a slow test, the whole
chain stage 1 -> 2 -> 3 through model.init_from."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_init_from import tiny_root  # noqa: E402

import hmerzoo  # noqa: E402
from hmerzoo import training  # noqa: E402
from hmerzoo.checkpoint import latest_checkpoint, load_weights  # noqa: E402
from hmerzoo.recipe import load_recipe  # noqa: E402

TINY = ["model.encoder.growth_rate=4", "model.encoder.num_layers=2", "data.batch_size=4", "data.num_workers=0",
        "train.device=cpu", "train.log_every=1"]
TINY_SSL = TINY + ["model.proj_dim=8", "model.hidden=16", "sched.warmup_steps=1"]
TINY_NECK = ["model.neck.d_model=16", "model.neck.hidden=8"]


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


def stage1(root: Path, run_dir: Path, steps: int = 2) -> Path:
    recipe = load_recipe("mask_match_pretrain", TINY_SSL + [f"data.root={root}", f"train.run_dir={run_dir}",
                                                           f"train.max_steps={steps}"])
    return training.train(recipe, console=quiet())


def stage2(root: Path, run_dir: Path, init: Path, steps: int, resume: str | None = None, *extra: str) -> Path:
    recipe = load_recipe("mask_match_attention", TINY_SSL + TINY_NECK + [
        f"data.root={root}", f"train.run_dir={run_dir}", f"train.max_steps={steps}", f"model.init_from={init}",
        "model.mask.steps=4", "model.mask.start=0.1", "model.mask.end=0.6", "train.ckpt_every=1", "train.keep_last=10",
        *extra])
    return training.train(recipe, resume=resume, console=quiet())


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("mask_match")
    root = tiny_root(base / "data", n=8, captions=False)
    return root, stage1(root, base / "stage1")


def test_resume_mid_stage_2_is_exact(tmp_path, pretrained):
    root, s1 = pretrained
    # the encoder is released at step 3, so the resumed half crosses the unfreezing too; a constant learning rate
    # (~sched), since the cosine schedule's length depends on train.max_steps
    straight = stage2(root, tmp_path / "straight", s1, 5, None, "train.unfreeze_at=3", "~sched")
    stage2(root, tmp_path / "resumed", s1, 2, None, "train.unfreeze_at=3", "~sched")
    resumed = stage2(root, tmp_path / "resumed", s1, 5, "auto", "train.unfreeze_at=3", "~sched")
    a, b = load_weights(latest_checkpoint(straight).weights), load_weights(latest_checkpoint(resumed).weights)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines = lambda run: [ln for ln in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda ln: ln.split('"images/s"')[0]  # noqa: E731
    assert [strip(x) for x in lines(straight)] == [strip(x) for x in lines(resumed)]
    # stage 1's encoder was the starting point and stayed fixed until step 3
    source = load_weights(latest_checkpoint(s1).weights)
    at2 = load_weights(straight / "checkpoints" / "step-00000002.safetensors")
    assert all(torch.equal(at2[k], v) for k, v in source.items() if k.startswith("encoder."))
    assert any(not torch.equal(a[k], v) for k, v in source.items() if k.startswith("encoder.") and "conv" in k)


def test_stage_2_masks_more_as_steps_go(tmp_path, pretrained):
    root, s1 = pretrained
    recipe = load_recipe("mask_match_attention", TINY_SSL + TINY_NECK + [
        f"data.root={root}", f"model.init_from={s1}", "model.mask.steps=10"])
    model = hmerzoo.build_model(recipe)
    from hmerzoo.training.init_from import prepare_model

    step = {"n": 0}
    prepare_model(model, recipe, None, lambda: step["n"])
    from test_mask_match import padded_batch

    ratios = []
    for n in (0, 5, 10):
        step["n"] = n
        out = model(padded_batch())
        valid = ~padded_batch().image_mask[:, ::16, ::16]
        ratios.append(out["hidden"].sum().item() / valid.sum().item())
    assert ratios[0] < ratios[1] < ratios[2]
    assert ratios[2] == pytest.approx(0.5, abs=0.1)


@pytest.mark.slow
def test_three_stages_end_to_end(tmp_path, pretrained):
    root, s1 = pretrained
    s2 = stage2(root, tmp_path / "stage2", s1, 2)
    tiny_root(root.parent / "data", n=8, captions=True)  # stage 3 needs captions: the same images, labelled
    recipe = load_recipe("mask_match", TINY + TINY_NECK + [
        "model.decoder.d_model=16", "model.decoder.nhead=2", "model.decoder.num_layers=1",
        "model.decoder.dim_feedforward=32", f"data.root={root}", "data.val_holdout=2", "train.max_steps=2",
        "train.val_every=1", "train.val_max_len=4", f"train.run_dir={tmp_path / 'stage3'}", f"model.init_from={s2}",
        "sched.patience=1"])
    console = quiet()
    s3 = training.train(recipe, console=console)
    table = console.file.getvalue()
    assert "model.init_from" in table and "│ encoder" in table and "│ neck" in table
    model = hmerzoo.load_model(s3)
    assert type(model.neck).__name__ == "AttentionNetwork"
    stage2_weights = load_weights(latest_checkpoint(s2).weights)
    assert set(k for k in stage2_weights if k.startswith(("encoder.", "neck."))) <= set(model.state_dict())
    from test_mask_match import padded_batch

    batch = padded_batch()
    with torch.no_grad():
        features, mask = model.encoder(batch.images, batch.image_mask)
        focus = model.neck.focus_map(features, mask)
    assert focus.flatten(1).sum(1).tolist() == pytest.approx([1.0] * 3)
    result = model.recognize(batch.images[0, :, :40, :96], beam_size=2, max_len=4)
    assert isinstance(result[0].latex, str)
