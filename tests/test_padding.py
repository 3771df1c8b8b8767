"""data.pad_multiple: padded sizes rounded up to a multiple (default 1: as before)."""
from __future__ import annotations

import pytest
import torch

from benchmark_modules import load_benchmark
from hmerzoo.batch import pad_images
from hmerzoo.config import DataConfig, make_section
from hmerzoo.data.crohme import Sample
from hmerzoo.data.loaders import collate_bucket


def test_pad_images_rounds_up_and_masks_the_extra():
    images = [torch.rand(1, 17, 30), torch.rand(1, 5, 33)]
    plain, plain_mask = pad_images(images)
    assert plain.shape == (2, 1, 17, 33)
    out, mask = pad_images(images, 16)
    assert out.shape == (2, 1, 32, 48) and mask.shape == (2, 32, 48)
    assert torch.equal(out[:, :, :17, :33], plain)
    assert out[:, :, 17:].abs().sum() == 0 and out[:, :, :, 33:].abs().sum() == 0
    assert torch.equal(mask[:, :17, :33], plain_mask) and mask[:, 17:].all() and mask[:, :, 33:].all()
    assert int((~mask).sum()) == 17 * 30 + 5 * 33
    assert pad_images([torch.rand(1, 32, 16)], 16)[0].shape == (1, 1, 32, 16)  # already a multiple


def test_collate_uses_the_multiple_and_the_recipe_checks_it():
    samples = [Sample("a", torch.rand(1, 9, 20), [4]), Sample("b", torch.rand(1, 12, 7), [5])]
    assert collate_bucket([samples]).images.shape[-2:] == (12, 20)
    assert collate_bucket([samples], pad_multiple=8).images.shape[-2:] == (16, 24)
    assert make_section(DataConfig, {}).pad_multiple == 1
    with pytest.raises(ValueError, match="pad_multiple"):
        make_section(DataConfig, {"pad_multiple": 0})


def test_padding_benchmark_counts_pixels_and_shapes():
    padding = load_benchmark("padding")
    sizes = [(10, 10), (12, 30), (20, 20)]
    rows = padding.padding_table(sizes, [[0, 1], [2]], [1, 16])
    assert rows[0]["real"] == 100 + 360 + 400
    assert rows[0]["padded"] == 2 * 12 * 30 + 400 and rows[1]["padded"] == 2 * 16 * 32 + 32 * 32
    assert rows[1]["vs_first"] == pytest.approx((2 * 16 * 32 + 1024) / 1120 - 1)
    assert [r["spatial"] for r in rows] == [2, 2]
