"""``prepare_image`` on real user images, and ``hmerzoo predict`` end to end with the converted BTTR fixture model.

The BTTR fixture weights were fitted to the two fixture images only, so those two are read correctly; every other
image just has to go through without an error. Tests needing ../shared skip when it is absent.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hmerzoo.cli import main
from hmerzoo.data.images import (COMER_HEIGHT_RANGE, COMER_WIDTH_RANGE, NATIVE_HEIGHT_RANGE, NATIVE_WIDTH_RANGE,
                                 load_image_tensor, looks_black_on_white, prepare_image, size_ranges_for_recipe)
from hmerzoo.errors import DataError
from hmerzoo.predict import collect_images, decode_settings

SHARED = Path(os.environ.get("HMERZOO_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
BTTR_FIXTURES = SHARED / "fixtures/parity/bttr"
FIXTURE_IMAGE = BTTR_FIXTURES / "image1_18_em_1.png"  # \sqrt { 4 8 }, 105 x 69, white on black
needs_fixtures = pytest.mark.skipif(not (BTTR_FIXTURES / "state_dict.safetensors").is_file(),
                                    reason=f"BTTR parity fixtures not found at {BTTR_FIXTURES} (set HMERZOO_SHARED)")
# short decoding: the odd images are not what the fixture model was fitted to, and may never emit <eos>
FAST = ["--beam", "1", "--max-len", "12"]


def _ink_image() -> np.ndarray:
    """A small synthetic white-on-black formula-like image (used where the shared fixtures are not needed)."""
    img = np.zeros((60, 150), dtype=np.uint8)
    img[20:40, 15:20] = 255
    img[28:32, 30:60] = 255
    img[18:42, 80:84] = 255
    img[18:22, 80:120] = 255
    return img


# --- prepare_image ------------------------------------------------------------------------------------------------
def test_white_on_black_in_range_is_bit_identical(tmp_path: Path) -> None:
    path = tmp_path / "x.bmp"
    Image.fromarray(_ink_image()).save(path)
    expected = load_image_tensor(path)
    for got in (prepare_image(path), prepare_image(str(path)), prepare_image(Image.open(path)),
                prepare_image(_ink_image()), prepare_image(expected)):
        assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_crohme_images_are_bit_identical(sample_root: Path) -> None:
    files = sorted(sample_root.glob("*/*.bmp"))
    assert len(files) == 96
    for path in files:
        expected = load_image_tensor(path)
        assert torch.equal(prepare_image(path, height_range=NATIVE_HEIGHT_RANGE, width_range=NATIVE_WIDTH_RANGE),
                           expected), path
        h, w = expected.shape[-2:]
        if COMER_HEIGHT_RANGE[0] <= h <= COMER_HEIGHT_RANGE[1] and COMER_WIDTH_RANGE[0] <= w <= COMER_WIDTH_RANGE[1]:
            assert torch.equal(prepare_image(path), expected), path


def test_black_on_white_is_inverted(tmp_path: Path) -> None:
    ink = _ink_image()
    expected = prepare_image(ink)
    assert not looks_black_on_white(ink) and looks_black_on_white(255 - ink)
    assert torch.equal(prepare_image(255 - ink), expected)
    assert torch.equal(prepare_image(Image.fromarray(255 - ink).convert("RGB")), expected)
    assert torch.equal(prepare_image(torch.from_numpy(255 - ink).float() / 255), expected)
    # forcing it either way (without the enhancement, which expects a dark background)
    assert torch.equal(prepare_image(ink, invert=True, enhance="none"), 1 - expected)
    assert torch.equal(prepare_image(255 - ink, invert=False, enhance="none"), 1 - expected)


def test_pixel_formats_become_the_same_gray(tmp_path: Path) -> None:
    ink = _ink_image()
    expected = prepare_image(ink)
    black_on_white = Image.fromarray(255 - ink)
    variants = {
        "rgb.png": black_on_white.convert("RGB"),
        "palette.png": black_on_white.convert("P"),
        "gray.bmp": black_on_white,
        "bilevel.tif": black_on_white.convert("1"),
        "white_on_black.png": Image.fromarray(ink),
        "16bit.png": Image.fromarray((255 - ink).astype(np.uint16) * 257),
    }
    # black strokes on a transparent canvas (what drawing apps export): the colour under the alpha is black too
    rgba = np.zeros(ink.shape + (4,), dtype=np.uint8)
    rgba[:, :, 3] = ink
    variants["transparent.png"] = Image.fromarray(rgba, "RGBA")
    for name, img in variants.items():
        img.save(tmp_path / name)
    # a phone photo stored sideways with an EXIF orientation tag (6: the viewer turns it 90 degrees clockwise)
    exif = Image.Exif()
    exif[0x0112] = 6
    black_on_white.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png", exif=exif)
    variants["sideways.png"] = None
    for name in variants:
        assert torch.equal(prepare_image(tmp_path / name), expected), name


def test_grey_paper_is_stretched_and_binarised() -> None:
    ink = _ink_image() > 0
    photo = np.where(ink, 70, 190).astype(np.uint8)  # dark grey pencil on grey paper
    stretched = prepare_image(photo)
    assert torch.equal(stretched, torch.from_numpy(ink.astype(np.float32))[None])
    noise = np.random.default_rng(0).integers(-15, 16, photo.shape)
    noisy = np.clip(photo.astype(int) + noise, 0, 255).astype(np.uint8)
    binary = prepare_image(noisy, enhance="binarize")
    assert set(binary.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(binary, stretched)
    # no enhancement: only the polarity is fixed
    assert torch.equal(prepare_image(photo, enhance="none"), torch.from_numpy(255 - photo).float()[None] / 255)
    # a blank page is not turned into noise
    blank = np.full((40, 80), 200, dtype=np.uint8)
    assert float(prepare_image(blank).max()) == 0.0


def test_polarity_of_photos() -> None:
    ink = _ink_image() > 0
    assert looks_black_on_white(np.where(ink, 30, 100).astype(np.uint8))  # dim photo: the paper is not bright
    assert not looks_black_on_white(np.where(ink, 230, 40).astype(np.uint8))  # chalk on a blackboard
    assert looks_black_on_white(np.full((20, 20), 250, dtype=np.uint8))  # a blank white page
    assert not looks_black_on_white(np.zeros((20, 20), dtype=np.uint8))
    dim_photo = np.where(ink, 30, 100).astype(np.uint8)
    assert torch.equal(prepare_image(dim_photo), torch.from_numpy(ink.astype(np.float32))[None])


def test_prepared_images_are_a_fixed_point() -> None:
    """model.recognize may prepare an image predict already prepared: the second pass must change nothing."""
    ink = _ink_image()
    rng = np.random.default_rng(1)
    noisy_photo = np.clip(np.where(ink > 0, 60, 180) + rng.integers(-20, 21, ink.shape), 0, 255).astype(np.uint8)
    cases = [ink, 255 - ink, noisy_photo, np.full((40, 80), 200, dtype=np.uint8),
             np.asarray(Image.fromarray(255 - ink).resize((3000, 40))), np.asarray(Image.fromarray(ink).resize((8, 5))),
             np.asarray(Image.fromarray(noisy_photo).resize((4000, 1000)))]
    for i, img in enumerate(cases):
        for kwargs in ({}, {"enhance": "binarize"}, {"height_range": NATIVE_HEIGHT_RANGE,
                                                      "width_range": NATIVE_WIDTH_RANGE}):
            once = prepare_image(img, **kwargs)
            again = prepare_image(once, **{k: v for k, v in kwargs.items() if k != "enhance"})
            assert torch.equal(again, once), (i, kwargs)


@pytest.mark.parametrize("height,width", [(40, 3000), (3000, 40), (5, 8), (1, 1), (3000, 4000), (300, 1500)])
def test_sizes_are_brought_into_range(height: int, width: int) -> None:
    img = Image.fromarray(_ink_image()).resize((width, height), Image.BILINEAR)
    for ranges in ({"height_range": COMER_HEIGHT_RANGE, "width_range": COMER_WIDTH_RANGE},
                   {"height_range": NATIVE_HEIGHT_RANGE, "width_range": NATIVE_WIDTH_RANGE},
                   {"height_range": (32, 64), "width_range": (32, 128)}):
        out = prepare_image(img, **ranges)
        h, w = out.shape[-2:]
        assert ranges["height_range"][0] <= h <= ranges["height_range"][1], (height, width, ranges, out.shape)
        assert ranges["width_range"][0] <= w <= ranges["width_range"][1], (height, width, ranges, out.shape)
        assert out.dtype == torch.float32 and 0.0 <= float(out.min()) and float(out.max()) <= 1.0
        if height * width > 1:
            assert float(out.max()) == 1.0  # the ink survives downscaling (area averaging + stretch)


def test_in_range_resize_follows_scale_to_limit() -> None:
    """Inside CoMER's aspect-ratio range the resize is exactly the ScaleToLimitRange models trained with."""
    from hmerzoo.data.transforms import ScaleToLimitRange

    for size in [(300, 600), (10, 40), (200, 1500)]:
        img = Image.fromarray(_ink_image()).resize(size[::-1], Image.NEAREST)
        expected = ScaleToLimitRange()(load_image_tensor(img))
        assert torch.equal(prepare_image(img, enhance="none"), expected), size


def test_size_ranges_follow_the_recipe() -> None:
    assert size_ranges_for_recipe({"data": {"scale_to_limit": True}}) == {
        "height_range": COMER_HEIGHT_RANGE, "width_range": COMER_WIDTH_RANGE}
    assert size_ranges_for_recipe({"data": {"scale_to_limit": False}})["width_range"] == NATIVE_WIDTH_RANGE
    assert size_ranges_for_recipe(None)["height_range"] == NATIVE_HEIGHT_RANGE
    with pytest.raises(ValueError, match="height_range"):
        prepare_image(_ink_image(), height_range=(0, 10))
    with pytest.raises(ValueError, match="enhance"):
        prepare_image(_ink_image(), enhance="sharpen")


def test_unreadable_files_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not an image at all")
    truncated = tmp_path / "truncated.png"
    buf = io.BytesIO()
    Image.fromarray(_ink_image()).save(buf, "PNG")
    truncated.write_bytes(buf.getvalue()[:60])
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path in (garbage, truncated, empty, tmp_path / "missing.png", tmp_path):
        with pytest.raises(DataError, match=str(path.name)):
            prepare_image(path)


def test_collect_images(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("b.PNG", "a.jpg", "c.tif", "notes.txt", "d.bmp"):
        (folder / name).write_bytes(b"")
    (folder / "sub.png").mkdir()
    found = collect_images(["z.png"], folder)
    assert found == ["z.png"] + [str(folder / n) for n in ("a.jpg", "b.PNG", "c.tif", "d.bmp")]
    with pytest.raises(DataError, match="not a directory"):
        collect_images([], tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        collect_images([], empty)


def test_decode_settings_come_from_the_recipe() -> None:
    class FakeModel:
        recipe = {"decode": {"beam_size": 10, "mode": "bttr"}}

    settings = decode_settings(FakeModel(), beam_size=3)
    assert settings["beam_size"] == 3 and settings["mode"] == "bttr" and settings["batching"] == "per_image"
    assert set(settings) == {"beam_size", "max_len", "alpha", "mode", "batching", "batch_size"}
    with pytest.raises(Exception, match="beam_size"):
        decode_settings(FakeModel(), beam_size=0)


# --- hmerzoo predict ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bttr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not (BTTR_FIXTURES / "state_dict.safetensors").is_file():
        pytest.skip(f"BTTR parity fixtures not found at {BTTR_FIXTURES} (set HMERZOO_SHARED)")
    from hmerzoo.convert import convert

    return convert("bttr", BTTR_FIXTURES / "state_dict.safetensors", tmp_path_factory.mktemp("bttr"))


@pytest.fixture(scope="module")
def user_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fixture image as users send it: every file kind and polarity, plus odd sizes and a broken file."""
    if not FIXTURE_IMAGE.is_file():
        pytest.skip(f"BTTR fixture image not found at {FIXTURE_IMAGE}")
    folder = tmp_path_factory.mktemp("user_images")
    original = Image.open(FIXTURE_IMAGE).convert("L")
    inverted = Image.fromarray(255 - np.asarray(original))
    files = {
        "original.png": original,
        "rgb.png": original.convert("RGB"),
        "photo.jpg": inverted.convert("RGB"),
        "scan.bmp": inverted,
        "gray.png": original,
        "black_on_white.png": inverted,
        "wide.png": inverted.resize((3000, 40)),
        "tall.png": inverted.resize((40, 3000)),
        "tiny.png": inverted.resize((8, 5)),
    }
    paths = {}
    for name, img in files.items():
        paths[name] = folder / name
        img.save(paths[name], quality=95) if name.endswith(".jpg") else img.save(paths[name])
    paths["broken.png"] = folder / "broken.png"
    paths["broken.png"].write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    return paths


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[str], str]:
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out.splitlines(), captured.err


@needs_fixtures
def test_predict_every_kind_of_input(bttr_dir: Path, user_images: dict[str, Path], capsys) -> None:
    order = list(user_images)
    status, lines, err = _run(["predict", str(bttr_dir), *map(str, user_images.values()), *FAST], capsys)
    assert status == 1  # the broken file
    assert f"{user_images['broken.png']}: cannot read the image" in err
    assert "1 of 10 images could not be read" in err
    results = dict(line.split("\t") for line in lines)
    assert [Path(p).name for p in results] == [n for n in order if n != "broken.png"]  # in order, nothing missing
    latex = {Path(p).name: tex for p, tex in results.items()}
    assert latex["original.png"] == r"\sqrt { 4 8 }"
    for name in ("rgb.png", "scan.bmp", "gray.png", "black_on_white.png"):  # lossless: the same tensor
        assert latex[name] == latex["original.png"], name


@needs_fixtures
def test_predict_json_and_dir(bttr_dir: Path, user_images: dict[str, Path], tmp_path: Path, capsys) -> None:
    folder = tmp_path / "dir"
    folder.mkdir()
    for name in ("original.png", "black_on_white.png", "broken.png"):
        (folder / name).write_bytes(user_images[name].read_bytes())
    (folder / "readme.txt").write_text("not an image")
    status, lines, err = _run(["predict", str(bttr_dir), "--dir", str(folder), "--json", *FAST], capsys)
    assert status == 1
    objects = [json.loads(line) for line in lines]
    assert [Path(o["image"]).name for o in objects] == ["black_on_white.png", "broken.png", "original.png"]
    for obj in objects:
        if Path(obj["image"]).name == "broken.png":
            assert set(obj) == {"image", "error"} and "broken.png" in obj["error"]
        else:
            assert set(obj) == {"image", "latex", "tokens", "score"}
            assert isinstance(obj["tokens"], list) and all(isinstance(t, int) for t in obj["tokens"])
            assert isinstance(obj["score"], float) and obj["latex"] == r"\sqrt { 4 8 }"
    assert objects[0]["tokens"] == objects[2]["tokens"] and objects[0]["score"] == objects[2]["score"]
    assert "broken.png" in err


@needs_fixtures
def test_predict_all_good_exits_zero(bttr_dir: Path, user_images: dict[str, Path], capsys) -> None:
    status, lines, err = _run(["predict", str(bttr_dir), str(user_images["black_on_white.png"]), *FAST], capsys)
    assert status == 0 and err == ""
    assert lines == [f"{user_images['black_on_white.png']}\t\\sqrt {{ 4 8 }}"]


@needs_fixtures
def test_predict_usage_errors(bttr_dir: Path, tmp_path: Path, capsys) -> None:
    status, lines, _ = _run(["predict", str(bttr_dir), "--dir", str(tmp_path)], capsys)
    assert status == 2 and "no images" in "\n".join(lines)
    status, lines, _ = _run(["predict", str(tmp_path / "no_model"), str(FIXTURE_IMAGE)], capsys)
    assert status == 2 and "no_model" in "\n".join(lines)
