"""Mask & Match's parts (hmerzoo/selfsup): losses, views and their correspondence, padding, masking schedule,
the attention network's focus map, the image-only dataset."""
from __future__ import annotations

import math
import sys
import zipfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_init_from import TINY_ENCODER, synthetic_image, tiny_root  # noqa: E402

from hmerzoo import build_model  # noqa: E402
from hmerzoo.batch import Batch, pad_images  # noqa: E402
from hmerzoo.selfsup.attention import AttentionNetwork  # noqa: E402
from hmerzoo.selfsup.images import ImageFolderDataset  # noqa: E402
from hmerzoo.selfsup.losses import DenseInfoNCE, dense_info_nce, nearest_positives, nt_xent  # noqa: E402
from hmerzoo.selfsup.masking import MaskSchedule, block_mask, hide_pixels  # noqa: E402
from hmerzoo.selfsup.views import TwoViews, feature_points  # noqa: E402
from hmerzoo.vocab import Vocabulary  # noqa: E402


# --- losses ---------------------------------------------------------------------------------------------------------
def test_nt_xent_equals_the_value_computed_by_hand():
    z1 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # a0, a1 (a1 normalised: (r, r), r = 1/sqrt 2)
    z2 = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # b0 = (1, 0), b1 = (0, 1)
    r, inv_t = 1 / math.sqrt(2), 2.0  # temperature 0.5
    e = lambda cos: math.exp(cos * inv_t)  # noqa: E731
    # each anchor: -log(e(positive) / sum of e(others)); cosines: a0.a1 = r, a0.b0 = 1, a0.b1 = 0, a1.b0 = r,
    # a1.b1 = r, b0.b1 = 0
    a0 = -math.log(e(1) / (e(r) + e(1) + e(0)))
    a1 = -math.log(e(r) / (e(r) + e(r) + e(r)))
    b0 = -math.log(e(1) / (e(1) + e(r) + e(0)))
    b1 = -math.log(e(r) / (e(0) + e(r) + e(0)))
    expected = (a0 + a1 + b0 + b1) / 4
    assert nt_xent(z1, z2, 0.5).item() == pytest.approx(expected, rel=1e-6)


def test_matched_views_give_a_lower_loss_than_shuffled_ones():
    g = torch.Generator().manual_seed(0)
    z1 = torch.randn(8, 16, generator=g)
    z2 = z1 + 0.3 * torch.randn(8, 16, generator=g)
    shuffled = z2[torch.roll(torch.arange(8), 1)]
    assert nt_xent(z1, z2, 0.1) < nt_xent(z1, shuffled, 0.1) - 1.0
    # dense: cells matched to the same cells vs to a shuffled arrangement of them
    q = torch.nn.functional.normalize(torch.randn(2, 12, 8, generator=g), dim=-1)
    q_b = torch.nn.functional.normalize(q + 0.2 * torch.randn(2, 12, 8, generator=g), dim=-1)
    index = torch.arange(12).expand(2, 12)
    anchors = valid = torch.ones(2, 12, dtype=torch.bool)
    perm = torch.randperm(12, generator=g)
    matched = dense_info_nce(q, q_b, index, anchors, valid, 0.2)
    assert matched < dense_info_nce(q, q_b[:, perm], index, anchors, valid, 0.2) - 1.0
    # with the other image's cells as extra negatives the loss can only grow
    assert matched < dense_info_nce(q, q_b, index, anchors, valid, 0.2, negatives="batch")


def padded_batch(seed: int = 0, pad_value: float = 0.0) -> Batch:
    import numpy as np

    rng = __import__("random").Random(seed)
    images = [torch.from_numpy(np.asarray(synthetic_image(rng, h, w), dtype=np.float32) / 255.0)[None]
              for h, w in ((40, 96), (32, 64), (48, 80))]
    x, m = pad_images(images)
    if pad_value:
        x = torch.where(m[:, None], torch.rand(x.shape, generator=torch.Generator().manual_seed(9)) * pad_value, x)
    return Batch(images=x, image_mask=m, tokens=[[], [], []], names=["a", "b", "c"])


def test_identity_views_pair_each_cell_with_itself():
    batch = padded_batch()
    views = TwoViews(identity=True)
    v1, v2 = views(batch.images, batch.image_mask)
    fmask = batch.image_mask[:, ::16, ::16]
    p1 = feature_points(v1.coords, v1.mask, fmask.shape[1:], 16).flatten(1, 2)
    p2 = feature_points(v2.coords, v2.mask, fmask.shape[1:], 16).flatten(1, 2)
    valid = ~fmask.flatten(1)
    index, close = nearest_positives(p1, p2, valid, 0.75 * 16)
    cells = torch.arange(valid.shape[1]).expand_as(index)
    assert torch.equal(index[valid], cells[valid]) and bool(close[valid].all())
    # a padded cell is never anyone's positive
    assert bool(valid.gather(1, index).all())


def test_augmented_views_keep_the_correspondence_and_never_flip():
    torch.manual_seed(3)
    batch = padded_batch()
    views = TwoViews(stroke=0.0, elastic=2.0, rotate=8, shear=0.2)
    view = views.view(batch.images, batch.image_mask)
    ink = (view.images[:, 0] > 0.9) & ~view.mask
    assert int(ink.sum()) > 50
    b, y, x = ink.nonzero(as_tuple=True)
    src = view.coords[b, y, x]  # the source point each inked view pixel shows
    sx, sy = src[:, 0].floor().long(), src[:, 1].floor().long()
    # the source has ink within one pixel of that point (bilinear sampling of >0.9 needs ink next to it)
    near = torch.zeros_like(sx, dtype=torch.bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            yy = (sy + dy).clamp(0, batch.images.shape[2] - 1)
            xx = (sx + dx).clamp(0, batch.images.shape[3] - 1)
            near |= batch.images[b, 0, yy, xx] > 0.5
    assert bool(near.all())
    # no flip: moving right in the view moves right in the source (the x-Jacobian stays positive)
    dxdx = view.coords[:, :, 1:, 0] - view.coords[:, :, :-1, 0]
    valid = ~(view.mask[:, :, 1:] | view.mask[:, :, :-1])
    assert bool((dxdx[valid] > 0).all())
    assert bool((view.images[:, 0][view.mask] == 0).all())  # padding is zero


def tiny_model(kind: str, root: Path):
    model = {"type": kind, "encoder": dict(TINY_ENCODER), "proj_dim": 8, "hidden": 16}
    if kind == "mask_match_pretrain":
        loss = {"type": "mask_match_contrastive", "anchors": "all"}
    else:
        model["neck"] = {"type": "mask_match_attention", "d_model": 8, "hidden": 4}
        model["mask"] = {"start": 0.3, "end": 0.3, "steps": 1}
        loss = {"type": "mask_match"}
    return build_model({"data": {"root": str(root)}, "model": model, "loss": loss, "optim": {"type": "sgd", "lr": 0.1}})


@pytest.mark.parametrize("kind", ["mask_match_pretrain", "mask_match_attention"])
def test_padded_pixels_change_no_loss(tmp_path, kind):
    model = tiny_model(kind, tiny_root(tmp_path, n=2, captions=False))
    model.train()
    results = []
    for pad_value in (0.0, 1.0):
        torch.manual_seed(11)
        out = model(padded_batch(pad_value=pad_value))
        results.append({k: v.item() for k, v in out["losses"].items()})
    assert results[0] == results[1]
    assert all(math.isfinite(v) and v > 0 for v in results[0].values())


def test_vocabulary_is_the_specials_without_a_dictionary(tmp_path):
    (tmp_path / "train").mkdir()
    model = tiny_model("mask_match_pretrain", tmp_path)
    assert model.vocab == Vocabulary(["<pad>", "<sos>", "<eos>"])


# --- stage 2: schedule, masks, the attention network ---------------------------------------------------------------
def test_mask_ratio_schedule_at_chosen_steps():
    linear = MaskSchedule(0.1, 0.5, "linear", steps=100)
    assert [linear(s) for s in (0, 50, 100, 500)] == pytest.approx([0.1, 0.3, 0.5, 0.5])
    cosine = MaskSchedule(0.1, 0.5, "cosine", steps=100)
    assert cosine(25) == pytest.approx(0.1 + 0.4 * (1 - math.cos(math.pi / 4)) / 2)
    assert cosine(50) == pytest.approx(0.3) and cosine(100) == pytest.approx(0.5)
    step = MaskSchedule(0.1, 0.4, "step", steps=100, stages=4)
    assert [step(s) for s in (0, 24, 25, 50, 74, 75, 100)] == pytest.approx([0.1, 0.1, 0.2, 0.3, 0.3, 0.4, 0.4])
    with pytest.raises(ValueError, match="mask.schedule"):
        MaskSchedule(schedule="exp")


def test_block_masks_hide_the_ratio_of_valid_cells_in_blocks():
    torch.manual_seed(0)
    valid = torch.zeros(2, 6, 10, dtype=torch.bool)
    valid[0, :6, :10] = True
    valid[1, :4, :6] = True  # 24 cells, the rest padding
    hidden = block_mask(valid, 0.25, block=2)
    assert hidden.flatten(1).sum(1).tolist() == [15, 6]
    assert not bool((hidden & ~valid).any())
    images = torch.ones(2, 1, 96, 160)
    shown = hide_pixels(images, hidden, 16)
    assert shown.sum().item() == 96 * 160 * 2 - 256 * (15 + 6)


def test_focus_map_contract():
    torch.manual_seed(0)
    net = AttentionNetwork(in_channels=6, d_model=8, hidden=4)
    features = torch.randn(2, 6, 3, 5)
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    mask[1, :, 3:] = True
    mask[1, 2, :] = True
    focus = net.focus_map(features, mask)
    assert focus.shape == (2, 3, 5)
    assert bool((focus >= 0).all()) and bool((focus[mask] == 0).all())
    assert focus.flatten(1).sum(1).tolist() == pytest.approx([1.0, 1.0])
    changed = features.clone()
    changed[1][:, mask[1]] = 100.0  # padded cells' features
    assert torch.equal(net.focus_map(changed, mask), focus)
    memory, out_mask = net(features, mask)
    assert memory.shape == (2, 3, 5, 8) and torch.equal(out_mask, mask)
    pooled, _ = net.pool(features, mask)
    assert pooled.shape == (2, 8)


def test_dense_loss_ignores_padded_cells():
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(1, 6, 4, generator=g), dim=-1)
    valid = torch.tensor([[True, True, True, True, False, False]])
    index = torch.arange(6)[None]
    a = dense_info_nce(q, q, index, valid, valid, 0.2)
    q2 = q.clone()
    q2[0, 4:] = q[0, 0]  # a padded cell made identical to cell 0: would be a hard negative if it counted
    assert dense_info_nce(q, q2, index, valid, valid, 0.2).item() == a.item()
    loss = DenseInfoNCE(radius=0.5, anchors="all")
    assert loss.negatives == "image"


# --- the image-only dataset ------------------------------------------------------------------------------------------
def test_images_dataset_reads_folders_recursively_zips_and_ignores_captions(tmp_path):
    import random

    rng = random.Random(0)
    root = tiny_root(tmp_path / "crohme", n=3)  # train/ with caption.txt and a dictionary
    (root / "train" / "deeper" / "more").mkdir(parents=True)
    synthetic_image(rng).save(root / "train" / "deeper" / "more" / "a.png")
    synthetic_image(rng).convert("L").save(root / "train" / "deeper" / "b.jpg")
    synthetic_image(rng).save(root / "train" / "c.tiff")
    buf = tmp_path / "x.png"
    synthetic_image(rng).save(buf)
    with zipfile.ZipFile(root / "train" / "inner.zip", "w") as zf:
        zf.write(buf, "sub/x.png")
        zf.writestr("notes.txt", "not an image")
    vocab = Vocabulary(["<pad>", "<sos>", "<eos>"])
    data = ImageFolderDataset(root, "train", vocab)
    assert sorted(data.names) == sorted(["img0.bmp", "img1.bmp", "img2.bmp", "deeper/more/a.png", "deeper/b.jpg",
                                         "c.tiff", "inner.zip/sub/x.png"])
    assert data.caption_lengths == [0] * 7
    for i in range(len(data)):
        image = data.load_image(i)
        assert image.shape[1:] == data.sizes[i] and image.max() > 0.5
    # a split that is a zip, and the root itself as split "."
    with zipfile.ZipFile(root / "test.zip", "w") as zf:
        zf.write(buf, "test/x.png")
    assert ImageFolderDataset(root, "test", vocab).names == ["test/x.png"]
    assert len(ImageFolderDataset(root / "train" / "deeper", ".", vocab)) == 2
    with pytest.raises(Exception, match="split 'nope' not found"):
        ImageFolderDataset(root, "nope", vocab)


def test_the_three_recipes_are_listed_and_chain_through_init_from():
    from hmerzoo.recipe import list_recipes, load_recipe, validate_recipe

    names = {p.stem for p in list_recipes()}
    assert {"mask_match_pretrain", "mask_match_attention", "mask_match"} <= names
    s1, s2, s3 = (load_recipe(n) for n in ("mask_match_pretrain", "mask_match_attention", "mask_match"))
    for recipe in (s1, s2, s3):
        validate_recipe(recipe)
    assert s1["model"]["type"] == "mask_match_pretrain" and s1["data"]["format"] == "images"
    assert s2["model"]["init_from"] == "runs/mask_match_pretrain" and s2["model"]["freeze"] == ["encoder"]
    assert s3["model"]["init_from"] == "runs/mask_match_attention"
    # the same encoder everywhere (so the weights transfer), and stage 2's neck is stage 3's
    bttr_encoder = load_recipe("bttr")["model"]["encoder"]
    assert s1["model"]["encoder"] == s2["model"]["encoder"] == s3["model"]["encoder"] == bttr_encoder
    assert s2["model"]["neck"] == {k: v for k, v in s3["model"]["neck"].items() if k != "gate"}
    assert s3["model"]["decoder"]["type"] == "bttr"


def test_a_self_supervised_stage_says_it_cannot_decode(tmp_path):
    from hmerzoo.errors import HmerzooError

    model = tiny_model("mask_match_pretrain", tiny_root(tmp_path, n=2, captions=False))
    batch = padded_batch()
    with pytest.raises(HmerzooError, match="data.val_holdout=0"):
        model.greedy(batch.images, batch.image_mask)
    with pytest.raises(HmerzooError, match="fine-tune it on captions first"):
        model.recognize([batch.images[0]])


def test_the_neck_with_gate_zero_is_bttrs_neck():
    from hmerzoo.necks.projection import BTTRProjection

    torch.manual_seed(0)
    net = AttentionNetwork(in_channels=6, d_model=8, hidden=4, gate=0.0)
    bttr = BTTRProjection(in_channels=6, d_model=8)
    bttr.load_state_dict({k: v for k, v in net.state_dict().items() if k.startswith(("feature_proj.", "norm."))})
    features = torch.randn(2, 6, 3, 5)
    mask = torch.zeros(2, 3, 5, dtype=torch.bool)
    mask[1, :, 4:] = True
    ours, theirs = net(features, mask)[0], bttr(features, mask)[0]
    assert torch.allclose(ours, theirs, atol=1e-6)
    net.gate.data.fill_(1.0)  # with the gate open the focus map re-weights the cells
    assert not torch.allclose(net(features, mask)[0], theirs, atol=1e-3)
