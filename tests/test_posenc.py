"""Position encodings: the BTTR and CoMER 2-D variants and the 1-D word encoding."""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from hmerzoo.layers.posenc import ImagePositionEncoding, WordPosEnc, image_position_encoding, word_position_table

SHARED = Path(os.environ.get("HMERZOO_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
COMER_FIXTURES = SHARED / "fixtures/parity/comer"


def _expected(x_pos: float, y_pos: float, d_model: int, variant: str) -> torch.Tensor:
    """The encoding of one pixel, written out channel by channel from the official formulas."""
    half = d_model // 2
    values = []
    for pos in (x_pos, y_pos):
        if variant == "bttr":  # channel k: frequency k, sin if k even else cos
            for k in range(half):
                angle = pos / 10000.0 ** (k / half)
                values.append(math.sin(angle) if k % 2 == 0 else math.cos(angle))
        else:  # channels 2i, 2i+1: sin, cos of frequency index 2i
            for i in range(half // 2):
                angle = pos / 10000.0 ** (2 * i / half)
                values += [math.sin(angle), math.cos(angle)]
    return torch.tensor(values)


@pytest.mark.parametrize("variant", ["bttr", "comer"])
def test_image_encoding_formula(variant: str) -> None:
    d = 16
    mask = torch.zeros(1, 3, 5, dtype=torch.bool)
    mask[:, :, 4:] = True  # last column is padding: x runs over 4 valid columns
    pe = image_position_encoding(mask, d, variant)
    assert pe.shape == (1, 3, 5, d)
    eps = 1e-6
    for r, c in [(0, 0), (2, 3), (1, 2)]:
        x_pos = (c + 1) / (4 + eps) * 2 * math.pi
        y_pos = (r + 1) / (3 + eps) * 2 * math.pi
        torch.testing.assert_close(pe[0, r, c], _expected(x_pos, y_pos, d, variant), atol=1e-5, rtol=1e-5)


def test_variants_differ() -> None:
    mask = torch.zeros(1, 4, 6, dtype=torch.bool)
    assert not torch.allclose(image_position_encoding(mask, 32, "bttr"), image_position_encoding(mask, 32, "comer"))
    with pytest.raises(ValueError, match="variant"):
        ImagePositionEncoding(32, variant="detr")


def test_padding_does_not_move_the_valid_area() -> None:
    # normalised by the valid extent: the same image padded more keeps the encoding of its valid pixels
    small = torch.zeros(1, 3, 4, dtype=torch.bool)
    big = torch.ones(1, 5, 9, dtype=torch.bool)
    big[:, :3, :4] = False
    for variant in ("bttr", "comer"):
        a = image_position_encoding(small, 32, variant)
        b = image_position_encoding(big, 32, variant)[:, :3, :4]
        torch.testing.assert_close(a, b)


def test_word_position_encoding() -> None:
    enc = WordPosEnc(d_model=8, max_len=20)
    assert "pe" in enc.state_dict()  # the official checkpoints store it
    table = word_position_table(20, 8)
    for t in (0, 3, 19):
        for i in range(4):
            angle = t / 10000.0 ** (2 * i / 8)
            assert table[t, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[t, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    x = torch.zeros(2, 5, 8)
    torch.testing.assert_close(enc(x, offset=3), table[3:8].expand(2, 5, 8))
    with pytest.raises(ValueError, match="max_len"):
        enc(torch.zeros(1, 18, 8), offset=3)


@pytest.mark.skipif(not COMER_FIXTURES.is_dir(), reason=f"CoMER parity fixtures not found at {COMER_FIXTURES} "
                    "(set HMERZOO_SHARED to the folder holding fixtures/parity)")
def test_comer_projection_matches_official_encoder() -> None:
    """DenseNet + comer_projection (conv -> CoMER 2-D pos-enc -> LayerNorm) reproduce CoMER's encoder output."""
    from safetensors.torch import load_file

    from hmerzoo.necks.comer_projection import CoMERProjection
    from hmerzoo.encoders.densenet import DenseNetB

    official = load_file(str(COMER_FIXTURES / "state_dict.safetensors"))
    golden = load_file(str(COMER_FIXTURES / "golden.safetensors"))
    prefix = "comer_model.encoder."
    encoder, neck = DenseNetB(), CoMERProjection(in_channels=684)
    encoder.load_state_dict({k[len(prefix + "model."):]: v for k, v in official.items()
                             if k.startswith(prefix + "model.")})
    neck.load_state_dict({k[len(prefix):]: v for k, v in official.items()
                          if k.startswith(prefix) and not k.startswith(prefix + "model.")})
    encoder.eval(), neck.eval()
    with torch.no_grad():
        memory, mask = neck(*encoder(golden["input.img"], golden["input.img_mask"]))
    assert torch.equal(mask, golden["enc_mask"])
    torch.testing.assert_close(memory, golden["enc_feature"], atol=1e-4, rtol=1e-4)
