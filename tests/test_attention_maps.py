"""Attention pictures (``hmerzoo predict --attention``) of converted parity models: every decoder family.

The maps are the decoder's own attention, recorded while it re-reads the chosen hypothesis teacher-forced: each is
a distribution over the feature map (non-negative, sums to 1), one per token, and recording changes no output.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from PIL import Image

from hmerzoo.attention_maps import attention_strip_png, recording, token_attention, write_attention
from hmerzoo.batch import pad_images
from hmerzoo.cli import main
from hmerzoo.decoding.recognize import image_tensors
from parity_harness import load_fixture

SYSTEMS = ["bttr", "comer", "hmer_mtl", "abm", "ical", "tamer", "posformer", "can"]
# the systems whose reduced parity goldens ship with the tests (tests/goldens/<system>/)
GOLDEN_SYSTEMS = ("ical", "tamer", "posformer", "can")
GOLDENS = Path(__file__).resolve().parent / "goldens"
_GOLDEN_CACHE: dict[str, dict] = {}
DECODE = {"beam_size": 2, "max_len": 60}  # short searches; the pictures follow whatever hypothesis won


def system_fixture(parity_dir: Path, system: str, tmp_path_factory) -> dict:
    """The converted parity model of ``system`` (ABM's golden file names its batch differently; ICAL, TAMER,
    PosFormer and CAN: the reduced goldens in tests/goldens)."""
    if system in GOLDEN_SYSTEMS:
        return golden_fixture(system, tmp_path_factory)

    def abm_batch(golden: dict):
        return golden["input.x"], golden["input.x_mask"] < 0.5

    return load_fixture(parity_dir / system, system, tmp_path_factory,
                        **({"batch": abm_batch} if system == "abm" else {}))


def golden_fixture(system: str, tmp_path_factory) -> dict:
    """dir, converted, model, tokens, images, image_mask of a system in tests/goldens (converted once)."""
    from safetensors.torch import load_file

    from hmerzoo import load_model
    from hmerzoo.convert import convert

    directory = GOLDENS / system
    if not (directory / "state_dict.safetensors").is_file():
        pytest.skip(f"{system} goldens not found in {directory}")
    if system not in _GOLDEN_CACHE:
        tmp = tmp_path_factory.mktemp(f"{system}_golden")
        golden = load_file(str(directory / "golden.safetensors"))
        meta = json.loads((directory / "meta.json").read_text())
        if system == "can":  # the official checkpoint format: {'model': state_dict}, words_dict.txt beside it
            torch.save({"model": load_file(str(directory / "state_dict.safetensors"))}, tmp / "can.pth")
            (tmp / "words_dict.txt").write_bytes((directory / "words_dict.txt").read_bytes())
            out = convert("can", tmp / "can.pth", tmp / "model")
            images = golden["input.images"]
            mask = torch.ones(images.shape[0], *images.shape[2:], dtype=torch.bool)
            for i, path in enumerate(sorted(directory.glob("image*.png"))):
                width, height = Image.open(path).size
                mask[i, :height, :width] = False
            lengths = golden["input.labels_mask"].sum(1).long().tolist()
            tokens = [row[:n - 1] for row, n in zip(golden["input.labels"].tolist(), lengths)]
        else:
            out = convert(system, directory / "state_dict.safetensors", tmp / "model")
            images, mask = golden["input.img"], golden["input.img_mask"].bool()
            tokens = [s["token_ids"] for s in meta["samples"]]
        _GOLDEN_CACHE[system] = {"dir": directory, "converted": out, "model": load_model(out), "tokens": tokens,
                                 "images": images, "image_mask": mask}
    return _GOLDEN_CACHE[system]


def _image(fixture: dict) -> Path:
    return sorted(fixture["dir"].glob("image*.png"))[0]


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.png"))


@pytest.mark.slow
@pytest.mark.parametrize("system", SYSTEMS)
def test_one_map_per_token_each_a_distribution(system, parity_dir, tmp_path_factory, tmp_path):
    fixture = system_fixture(parity_dir, system, tmp_path_factory)
    model = fixture["model"]
    pictures = write_attention(model, _image(fixture), tmp_path, DECODE)
    chosen = pictures.attention[0]
    tokens = pictures.latex.split()
    assert chosen.tokens == tokens and len(tokens) > 3
    # ABM decodes with its L2R branch and also shows the R2L branch's attention on the same tokens
    assert [a.direction for a in pictures.attention] == (["l2r", "r2l"] if system == "abm" else [chosen.direction])
    for found in pictures.attention:
        maps = found.maps
        assert maps.shape[0] == len(tokens) and maps.dim() == 3
        assert float(maps.min()) >= 0.0
        assert torch.allclose(maps.flatten(1).sum(1), torch.ones(len(tokens)), atol=1e-4)
        # not uniform: the decoder looks somewhere (the reduced goldens' small models look less sharply)
        assert float(maps.max()) > (1.5 if system in GOLDEN_SYSTEMS else 2.0) / maps[0].numel()
        folder = tmp_path if found is chosen else tmp_path / found.direction
        files = _pngs(folder)
        assert len(files) == len(tokens) + 1 and (folder / "strip.png") in files
        first = Image.open(folder / f"001_{''.join(c for c in tokens[0] if c.isalnum()) or 'x'}.png")
        image = image_tensors([_image(fixture)], model.recipe)[0]
        assert first.size == (max(image.shape[2], 120), image.shape[1] + 28)  # the image plus its caption band
    assert not (tmp_path / "attention_network.png").exists()  # no neck with a focus map here
    if system == "can":  # the demo page's strip: CAN's attention as well
        image = image_tensors([_image(fixture)], model.recipe)[0]
        recognition = model.recognize([_image(fixture)], **DECODE)[0]
        strip = attention_strip_png(model, image, recognition)
        assert strip is not None and Image.open(io.BytesIO(strip)).size == Image.open(tmp_path / "strip.png").size


@pytest.mark.slow
@pytest.mark.parametrize("system", ["bttr", "comer"])
def test_recording_is_off_by_default_and_changes_nothing(system, parity_dir, tmp_path_factory):
    fixture = system_fixture(parity_dir, system, tmp_path_factory)
    model, decoder = fixture["model"], fixture["model"].decoder
    tokens = fixture["tokens"][0]
    image = image_tensors([_image(fixture)], model.recipe)[0]
    x, m = pad_images([image])
    with torch.no_grad():
        memory, mask = model.encode(x, m)
        plain, _ = decoder.teacher_forced(memory, mask, [tokens], "l2r")
        with recording(decoder) as layers:
            recorded, _ = decoder.teacher_forced(memory, mask, [tokens], "l2r")
    assert all(layer.multihead_attn.recorded is None for layer in decoder.layers)
    assert torch.equal(plain, recorded)
    assert [len(r) for r in layers] == [1] * len(decoder.layers)
    assert layers[0][0].shape == (1, decoder.nhead, len(tokens) + 1, mask[0].numel())
    found = token_attention(model, image, tokens, "l2r")
    expected = torch.stack([r[0][0] for r in layers]).mean(dim=(0, 1))[:len(tokens)]
    assert torch.allclose(found.maps.flatten(1), expected, atol=1e-6)


@pytest.mark.slow
def test_recorded_weights_are_the_ones_attention_used(parity_dir, tmp_path_factory):
    fixture = system_fixture(parity_dir, "bttr", tmp_path_factory)
    attn = fixture["model"].decoder.layers[0].multihead_attn
    torch.manual_seed(0)
    q, k, v = torch.randn(2, attn.nhead, 5, attn.head_dim), torch.randn(2, attn.nhead, 7, attn.head_dim), \
        torch.randn(2, attn.nhead, 7, attn.head_dim)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[1, ..., 4:] = False
    attn.recorded = []
    try:
        with torch.no_grad():
            out = attn.attend(q, k, v, mask)
            weights = attn.recorded[0]
            assert torch.allclose(attn.merge_heads(weights @ v), out, atol=1e-5)
    finally:
        attn.recorded = None
    assert float(weights[1, ..., 4:].abs().max()) == 0.0


class FocusNeck(nn.Module):
    """The converted neck plus a focus map (as an attention network in front of the decoder would have)."""

    def __init__(self, neck: nn.Module):
        super().__init__()
        self.inner = neck

    def forward(self, features, mask):
        return self.inner(features, mask)

    def focus_map(self, features, mask):
        energy = features.mean(1).masked_fill(mask, float("-inf"))
        return torch.softmax(energy.flatten(1), 1).view_as(energy)


@pytest.mark.slow
def test_cli_and_a_neck_focus_map(parity_dir, tmp_path_factory, tmp_path):
    fixture = system_fixture(parity_dir, "bttr", tmp_path_factory)
    images = sorted(fixture["dir"].glob("image*.png"))
    out = tmp_path / "att"
    assert main(["predict", str(fixture["converted"]), *map(str, images), "--attention", str(out), "--beam", "2",
                 "--device", "cpu"]) == 0
    for image in images:  # several images: one folder each
        assert (out / image.stem / "strip.png").is_file()
        assert len(_pngs(out / image.stem)) >= 3
    model = fixture["model"]
    neck = model.neck
    model.neck = FocusNeck(neck)
    try:
        pictures = write_attention(model, images[1], tmp_path / "focus", DECODE)
    finally:
        model.neck = neck
    assert (tmp_path / "focus" / "attention_network.png").is_file()
    assert pictures.focus is not None and abs(float(pictures.focus.sum()) - 1.0) < 1e-4
