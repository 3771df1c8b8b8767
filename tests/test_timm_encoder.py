import json

import torch

from hmerzoo.encoders.timm_backbone import TimmEncoder


def test_timm_encoder_shapes_and_mask():
    enc = TimmEncoder("resnet18")
    assert enc.out_channels == 512 and enc.stride == 32
    images = torch.rand(2, 1, 96, 200)
    mask = torch.ones(2, 96, 200, dtype=torch.bool)
    mask[0] = False  # full image
    mask[1, :40, :70] = False  # valid top-left 40 x 70
    feats, fmask = enc(images, mask)
    assert feats.shape[:2] == (2, 512) and fmask.shape == (2, *feats.shape[-2:])
    assert not fmask[0].any()
    # ceil(40/32)=2 rows, ceil(70/32)=3 columns valid
    assert (~fmask[1]).sum() == 6 and not fmask[1, :2, :3].any()


def test_timm_backbone_trains_two_steps(tmp_path, sample_root):
    from hmerzoo.recipe import load_recipe, validate_recipe
    from hmerzoo.trainer import train

    recipe = load_recipe("bttr", [
        f"data.root={sample_root}", "data.val_holdout=4", "data.batch_size=4", "data.num_workers=0",
        "model.encoder={type: timm, name: resnet18}",
        "model.neck.d_model=64", "model.decoder.d_model=64", "model.decoder.nhead=4",
        "model.decoder.num_layers=1", "model.decoder.dim_feedforward=128",
        "train.max_steps=2", "train.log_every=1", "train.val_every=0", f"train.output_dir={tmp_path}",
    ])
    validate_recipe(recipe)
    run_dir = train(recipe)
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [l["loss"] for l in lines if "loss" in l]
    assert len(losses) >= 2 and all(torch.isfinite(torch.tensor(losses)))
