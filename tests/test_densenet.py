"""DenseNet-B encoder: output sizes, channels, mask downsampling and parameter counts of both variants."""
from __future__ import annotations

import math

import pytest
import torch

from hmerzoo.encoders.densenet import DenseNetB
from hmerzoo.registry import ENCODERS

VARIANTS = {
    "bttr_comer": dict(stem_norm=True, post_norm=True),  # stem BN "norm1" + final "post_norm"
    "abm_can": dict(stem_norm=False, post_norm=False),
}


def analytic_parameter_count(growth_rate: int = 24, num_layers: int = 16, reduction: float = 0.5,
                             stem_norm: bool = True, post_norm: bool = True) -> tuple[int, int]:
    """(parameters, output channels) of DenseNet-B counted from its definition (reference-models.md §0)."""
    g = growth_rate
    channels = 2 * g
    count = 7 * 7 * channels + (2 * channels if stem_norm else 0)  # stem conv (no bias) + BN affine
    for block in range(3):
        for _ in range(num_layers):
            # 1x1 conv to 4g + BN, 3x3 conv to g + BN (convs without bias)
            count += channels * 4 * g + 2 * 4 * g + 4 * g * g * 9 + 2 * g
            channels += g
        if block < 2:
            out = math.floor(channels * reduction)
            count += channels * out + 2 * out  # transition 1x1 conv + BN
            channels = out
    if post_norm:
        count += 2 * channels
    return count, channels


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_parameter_count_matches_analytic(variant: str) -> None:
    enc = DenseNetB(**VARIANTS[variant])
    expected, channels = analytic_parameter_count(**VARIANTS[variant])
    assert channels == 684
    assert enc.out_channels == 684
    assert sum(p.numel() for p in enc.parameters()) == expected


def test_variants_differ_only_by_the_two_norms() -> None:
    full = DenseNetB(stem_norm=True, post_norm=True).state_dict()
    bare = DenseNetB(stem_norm=False, post_norm=False).state_dict()
    assert set(full) - set(bare) == {f"{n}.{p}" for n in ("norm1", "post_norm")
                                     for p in ("weight", "bias", "running_mean", "running_var",
                                               "num_batches_tracked")}
    assert set(bare) <= set(full)


def test_official_submodule_names() -> None:
    keys = set(DenseNetB().state_dict())
    for key in ("conv1.weight", "norm1.weight", "dense1.0.conv1.weight", "dense1.0.bn1.running_var",
                "dense1.15.conv2.weight", "dense3.15.bn2.bias", "trans1.conv1.weight", "trans2.bn1.weight",
                "post_norm.running_mean"):
        assert key in keys, key
    assert not any(k.startswith("trans3") or k.startswith("dense4") for k in keys)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("hw", [(64, 96), (37, 53), (17, 150)])
def test_shapes_and_mask(variant: str, hw: tuple[int, int]) -> None:
    torch.manual_seed(0)
    enc = DenseNetB(**VARIANTS[variant]).eval()
    h, w = hw
    images = torch.rand(2, 1, h, w)
    mask = torch.zeros(2, h, w, dtype=torch.bool)
    mask[1, h // 2:, :] = True  # second image padded at the bottom and right
    mask[1, :, w // 3:] = True
    with torch.no_grad():
        feats, out_mask = enc(images, mask)
    # stride-2 conv, ceil-mode max pool and two ceil-mode avg pools: each halves a size, rounding up
    assert feats.shape == (2, 684, math.ceil(h / 16), math.ceil(w / 16))
    assert out_mask.shape == feats.shape[:1] + feats.shape[2:]
    assert out_mask.dtype == torch.bool
    # four strided slicings [:, 0::2, 0::2] = keep every 16th row/column starting at 0 (not pooling)
    assert torch.equal(out_mask, mask[:, ::16, ::16])
    assert torch.isfinite(feats).all()


def test_registered_and_trains() -> None:
    assert ENCODERS.get("densenet") is DenseNetB
    torch.manual_seed(0)
    enc = DenseNetB(growth_rate=4, num_layers=2)  # tiny: the same code path, fast backward
    images = torch.rand(2, 1, 32, 48)
    feats, _ = enc(images, torch.zeros(2, 32, 48, dtype=torch.bool))
    assert feats.shape[1] == enc.out_channels
    feats.mean().backward()
    assert enc.conv1.weight.grad is not None and enc.conv1.weight.grad.abs().sum() > 0


def test_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    enc = DenseNetB(growth_rate=4, num_layers=2, dropout=0.5).eval()
    x, m = torch.rand(1, 1, 32, 32), torch.zeros(1, 32, 32, dtype=torch.bool)
    with torch.no_grad():
        assert torch.equal(enc(x, m)[0], enc(x, m)[0])


def test_kaiming_uniform_init_option():
    import math

    import pytest
    import torch.nn as nn

    from hmerzoo.encoders.densenet import DenseNetB

    torch.manual_seed(0)
    net = DenseNetB(growth_rate=4, num_layers=2, stem_norm=False, post_norm=False, init="kaiming_uniform")
    conv = net.dense1[0].conv2  # 3x3 conv, fan_in = 16 * 9
    bound = math.sqrt(2.0) * math.sqrt(3.0 / (16 * 9))
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    default = DenseNetB(growth_rate=4, num_layers=2).dense1[0].conv2.weight  # PyTorch's: bound 1/sqrt(fan_in)
    assert default.abs().max() <= 1 / math.sqrt(16 * 9)
    with pytest.raises(ValueError, match="init must be"):
        DenseNetB(init="xavier")
    assert isinstance(conv, nn.Conv2d)
