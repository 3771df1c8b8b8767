"""Tests of hmerzoo.data: readers (folder and zip), errors, bucketing, sampler, transforms, loaders."""
from __future__ import annotations

import math
import random
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hmerzoo.config import DataConfig
from hmerzoo.data import (REASON_TOO_BIG, REASON_TOO_LONG, BucketSampler, CrohmeDataset, DataReport,
                          ScaleAugmentation, ScaleToLimitRange, available_splits, bucket_names, build_dataloaders,
                          build_eval_loader, load_image_tensor, make_buckets, read_image_bytes, resize_like_cv2)
from hmerzoo.data.crohme import (REASON_DUPLICATE, REASON_EMPTY_CAPTION, REASON_MISSING_IMAGE,
                                 REASON_UNKNOWN_TOKEN, REASON_UNREADABLE_IMAGE)
from hmerzoo.errors import DataError
from hmerzoo.registry import DATASETS, TRANSFORMS
from hmerzoo.vocab import Vocabulary

REPO = Path(__file__).resolve().parents[1]

TOKENS = ["a", "b", "c", "+", "1", "2", "x"]


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary(["<pad>", "<sos>", "<eos>"] + TOKENS)


# --- tiny data built in tmp_path -------------------------------------------------------------------------------

def _image(height: int, width: int, seed: int) -> np.ndarray:
    """White strokes on black, like CROHME."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width), dtype=np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, height), rng.integers(0, width)
        img[y: y + 3, x: x + 7] = 255
    return img


def _entries(n: int, seed: int = 0) -> list[tuple[str, int, int, str]]:
    """(name, height, width, caption) with assorted sizes and lengths."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        h, w = rng.randint(20, 120), rng.randint(20, 400)
        caption = " ".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 12)))
        out.append((f"s{i:03d}", h, w, caption))
    return out


def _split_files(entries, caption_lines: list[str] | None = None) -> dict[str, bytes]:
    """File name -> bytes of one split (caption.txt + BMPs)."""
    import io
    files = {}
    for k, (name, h, w, _) in enumerate(entries):
        buf = io.BytesIO()
        Image.fromarray(_image(h, w, seed=k)).save(buf, format="BMP")
        files[f"{name}.bmp"] = buf.getvalue()
    lines = caption_lines if caption_lines is not None else [f"{name}\t{cap}" for name, _, _, cap in entries]
    files["caption.txt"] = ("\n".join(lines) + "\n").encode()
    return files


def write_dir_split(root: Path, split: str, files: dict[str, bytes]) -> None:
    (root / split).mkdir(parents=True, exist_ok=True)
    for fname, data in files.items():
        (root / split / fname).write_bytes(data)


def write_zip_split(root: Path, split: str, files: dict[str, bytes]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(root / f"{split}.zip", "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for fname, data in files.items():
            zf.writestr(f"{split}/{fname}", data)


@pytest.fixture
def tiny_roots(tmp_path: Path) -> tuple[Path, Path]:
    """A folder root and a zip root with the same train (40 samples) and test (12 samples) splits."""
    train, test = _split_files(_entries(40, seed=1)), _split_files(_entries(12, seed=2))
    dir_root, zip_root = tmp_path / "dirs", tmp_path / "zips"
    write_dir_split(dir_root, "train", train)
    write_dir_split(dir_root, "test", test)
    write_zip_split(zip_root, "train", train)
    write_zip_split(zip_root, "test", test)
    return dir_root, zip_root


def _batches(loader) -> list:
    return [b for b in loader]


def _assert_same_batches(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.names == y.names
        assert x.tokens == y.tokens
        assert torch.equal(x.images, y.images)
        assert torch.equal(x.image_mask, y.image_mask)


# --- images ------------------------------------------------------------------------------------------------------

def test_load_image_tensor_accepts_pil_numpy_tensor_and_path(tmp_path: Path):
    gray = _image(30, 50, seed=0)
    path = tmp_path / "x.bmp"
    Image.fromarray(gray).save(path)
    expected = torch.from_numpy(gray.astype(np.float32) / 255.0)[None]
    rgb = np.stack([gray] * 3, axis=-1)
    rgba = np.concatenate([rgb, np.full((30, 50, 1), 7, np.uint8)], axis=-1)
    inputs = [gray, path, str(path), Image.fromarray(gray), Image.fromarray(rgb), Image.fromarray(rgba), rgb, rgba,
              gray[:, :, None], gray.astype(np.float32) / 255.0, gray.astype(np.float64),  # 0..255 floats
              torch.from_numpy(gray), torch.from_numpy(gray)[None]]
    for img in inputs:
        t = load_image_tensor(img)
        assert t.dtype == torch.float32 and t.shape == (1, 30, 50), type(img)
        assert torch.allclose(t, expected, atol=1e-6), type(img)  # no polarity change, gray kept


def test_load_image_tensor_real_sample_is_white_on_black(sample_root: Path):
    path = next((sample_root / "train").glob("*.bmp"))
    t = load_image_tensor(path)
    assert t.shape[0] == 1 and t.min() == 0.0 and t.max() == 1.0
    assert t.mean() < 0.5  # mostly black background


def test_read_image_bytes_errors_name_the_file(tmp_path: Path):
    with pytest.raises(DataError, match="train.zip:train/bad.bmp"):
        read_image_bytes(b"not an image", where="train.zip:train/bad.bmp")
    with pytest.raises(DataError, match="missing.bmp"):
        load_image_tensor(tmp_path / "missing.bmp")
    arr = read_image_bytes(_split_files(_entries(1))["s000.bmp"], where="x")
    assert arr.dtype == np.uint8 and arr.ndim == 2


# --- reader: folders, zips, errors ---------------------------------------------------------------------------------

def test_folder_and_zip_roots_give_identical_batches(tiny_roots, vocab):
    dir_root, zip_root = tiny_roots
    results = []
    for root in (dir_root, zip_root):
        cfg = DataConfig(root=str(root), val_split="test", batch_size=4, max_pixels=60_000, scale_aug=True,
                         scale_to_limit=True, num_workers=0)
        bundle = build_dataloaders(cfg, vocab, seed=3)
        batches = []
        for epoch in (0, 1):
            bundle.train_sampler.set_epoch(epoch)
            batches += _batches(bundle.train)
        results.append((batches, _batches(bundle.val), bundle.num_train_samples, bundle.num_val_samples))
    (train_a, val_a, ntr_a, nval_a), (train_b, val_b, ntr_b, nval_b) = results
    _assert_same_batches(train_a, train_b)
    _assert_same_batches(val_a, val_b)
    assert (ntr_a, nval_a) == (ntr_b, nval_b) == (40, 12)


def test_root_may_be_one_zip_holding_split_folders(tiny_roots, tmp_path, vocab):
    dir_root, _ = tiny_roots
    data_zip = tmp_path / "data.zip"  # CoMER's data.zip layout
    with zipfile.ZipFile(data_zip, "w") as zf:
        for path in sorted(dir_root.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(dir_root).as_posix())
    a, b = CrohmeDataset(dir_root, "test", vocab), CrohmeDataset(data_zip, "test", vocab)
    assert a.names == b.names and a.sizes == b.sizes
    assert torch.equal(a[3].image, b[3].image)
    assert available_splits(data_zip) == ["test", "train"]


def test_folder_is_preferred_over_zip(tmp_path, vocab):
    write_dir_split(tmp_path, "train", _split_files(_entries(3, seed=1)))
    write_zip_split(tmp_path, "train", _split_files([("zip_only", 20, 20, "a")]))
    ds = CrohmeDataset(tmp_path, "train", vocab)
    assert ds.names == ["s000", "s001", "s002"]
    (tmp_path / "train" / "caption.txt").unlink()  # no usable folder any more: the zip is used
    assert CrohmeDataset(tmp_path, "train", vocab).names == ["zip_only"]


def test_images_decode_lazily_and_headers_give_sizes(tiny_roots, vocab):
    _, zip_root = tiny_roots
    ds = CrohmeDataset(zip_root, "train", vocab)
    assert ds.source._files  # the zip listing was read once
    sample = ds[5]
    assert sample.image.shape == (1, *ds.sizes[5])
    assert sample.ids == vocab.encode(_entries(40, seed=1)[5][3])


def test_zip_handle_is_reopened_in_forked_worker_processes(tiny_roots, vocab):
    """A DataLoader with worker processes over a zip root gives the batches of the in-process loader."""
    _, zip_root = tiny_roots
    bundles = [build_dataloaders(DataConfig(root=str(zip_root), val_split="test", batch_size=4, max_pixels=60_000,
                                            scale_aug=True, num_workers=workers), vocab, seed=5)
               for workers in (0, 2)]
    ds = bundles[1].train.dataset.dataset
    ds.source.archive()  # the parent holds an open handle before the workers fork
    for bundle in bundles:
        bundle.train_sampler.set_epoch(2)
    _assert_same_batches(_batches(bundles[0].train), _batches(bundles[1].train))
    _assert_same_batches(_batches(bundles[0].val), _batches(bundles[1].val))


@pytest.mark.parametrize("layout", ["dir", "zip"])
def test_missing_root_and_split_errors(tmp_path, vocab, layout):
    with pytest.raises(DataError, match=r"data\.root=DIR") as e:
        CrohmeDataset(tmp_path / "nowhere", "train", vocab)
    assert "nowhere" in str(e.value) and "caption.txt" in str(e.value)
    with pytest.raises(DataError, match="data.root is not set"):
        CrohmeDataset(None, "train", vocab)
    files = _split_files(_entries(2))
    writer = write_dir_split if layout == "dir" else write_zip_split
    writer(tmp_path, "train", files)
    writer(tmp_path, "2014", files)
    with pytest.raises(DataError, match="split '2015' not found") as e:
        CrohmeDataset(tmp_path, "2015", vocab)
    assert "2014, train" in str(e.value) and "did you mean '2014'" in str(e.value)


def _write(tmp_path: Path, layout: str, files: dict[str, bytes]) -> str:
    (write_dir_split if layout == "dir" else write_zip_split)(tmp_path, "train", files)
    return str(tmp_path / "train" / "caption.txt") if layout == "dir" else f"{tmp_path / 'train.zip'}:train/caption.txt"


@pytest.mark.parametrize("layout", ["dir", "zip"])
def test_caption_errors_name_file_and_line(tmp_path, vocab, layout):
    entries = _entries(3)
    # line 1 ok, line 2 blank (tolerated), line 3 has an unknown token
    lines = [f"s000\t{entries[0][3]}", "", "s001\ta + \\beta", f"s002\t{entries[2][3]}"]
    caption = _write(tmp_path, layout, _split_files(entries, lines))
    with pytest.raises(DataError) as e:
        CrohmeDataset(tmp_path, "train", vocab)
    assert f"{caption}:3: token '\\beta'" in str(e.value) and "skip_bad" in str(e.value)

    lines = [f"s000\t{entries[0][3]}", "s001", f"s002\t{entries[2][3]}"]
    caption = _write(tmp_path / "empty", layout, _split_files(entries, lines))
    with pytest.raises(DataError, match=f"{caption}:2: 's001' has an empty caption".replace("\\", "\\\\")):
        CrohmeDataset(tmp_path / "empty", "train", vocab)


@pytest.mark.parametrize("layout", ["dir", "zip"])
def test_image_errors_name_the_member(tmp_path, vocab, layout):
    files = _split_files(_entries(3))
    del files["s001.bmp"]
    caption = _write(tmp_path / "missing", layout, files)
    with pytest.raises(DataError) as e:
        CrohmeDataset(tmp_path / "missing", "train", vocab)
    member = (str(tmp_path / "missing" / "train" / "s001.bmp") if layout == "dir"
              else f"{tmp_path / 'missing' / 'train.zip'}:train/s001.bmp")
    assert f"{caption}:2: image for 's001' not found" in str(e.value) and member in str(e.value)

    files = _split_files(_entries(3))
    files["s002.bmp"] = b"BM garbage"
    caption = _write(tmp_path / "bad", layout, files)
    with pytest.raises(DataError) as e:
        CrohmeDataset(tmp_path / "bad", "train", vocab)
    assert f"{caption}:3: " in str(e.value) and "s002.bmp: cannot read the image" in str(e.value)


@pytest.mark.parametrize("layout", ["dir", "zip"])
def test_skip_bad_counts_every_reason(tmp_path, vocab, layout):
    entries = _entries(10)
    lines = [f"{n}\t{c}" for n, _, _, c in entries]
    lines[1] = "s001\ta \\gamma"  # unknown token
    lines[2] = "s002"  # empty caption
    lines[5] = f"s004\t{entries[5][3]}"  # duplicate name
    files = _split_files(entries, lines)
    del files["s006.bmp"]  # missing image
    files["s007.bmp"] = b"garbage"  # unreadable image
    _write(tmp_path, layout, files)
    report = DataReport()
    ds = CrohmeDataset(tmp_path, "train", vocab, skip_bad=True, report=report)
    assert ds.names == ["s000", "s003", "s004", "s008", "s009"]
    for reason in (REASON_UNKNOWN_TOKEN, REASON_EMPTY_CAPTION, REASON_DUPLICATE, REASON_MISSING_IMAGE,
                   REASON_UNREADABLE_IMAGE):
        assert report.count(reason) == 1, reason
    assert report.num_skipped == 5 and report.num_filtered == 0
    summary = report.summary()
    assert "5 samples left out" in summary and "caption.txt:2: token '\\gamma'" in summary


def test_skip_bad_also_covers_images_that_fail_to_decode_later(tmp_path, vocab):
    files = _split_files(_entries(6))
    good = files["s003.bmp"]
    files["s003.bmp"] = good[: len(good) // 2]  # the header reads, the pixels are truncated
    write_dir_split(tmp_path, "train", files)
    cfg = DataConfig(root=str(tmp_path), val_holdout=0, num_workers=0)
    with pytest.raises(DataError, match="s003.bmp"):
        _batches(build_dataloaders(cfg, vocab, seed=0).train)
    cfg.skip_bad = True
    bundle = build_dataloaders(cfg, vocab, seed=0)
    with pytest.warns(UserWarning, match="s003"):
        names = [n for b in _batches(bundle.train) for n in b.names]
    assert sorted(names) == ["s000", "s001", "s002", "s004", "s005"]
    assert bundle.report.count(REASON_UNREADABLE_IMAGE) == 1


def test_registries():
    assert DATASETS.get("crohme") is CrohmeDataset
    assert TRANSFORMS.get("scale_to_limit") is ScaleToLimitRange
    assert TRANSFORMS.get("scale_aug") is ScaleAugmentation


# --- bucketing ---------------------------------------------------------------------------------------------------

def _random_sizes(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(10, 400), rng.randint(10, 1600)) for _ in range(n)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_buckets_respect_limits_and_drop_nothing_at_eval(seed):
    sizes = _random_sizes(500, seed)
    names = [f"n{i}" for i in range(len(sizes))]
    batch_size, max_pixels = 8, 320_000
    buckets = make_buckets(sizes, names, batch_size=batch_size, max_pixels=max_pixels)
    assert sorted(i for b in buckets for i in b) == list(range(len(sizes)))  # every sample exactly once
    for bucket in buckets:
        areas = [sizes[i][0] * sizes[i][1] for i in bucket]
        assert 1 <= len(bucket) <= batch_size
        assert max(areas) * len(bucket) <= max_pixels or len(bucket) == 1  # oversize images sit alone
    assert any(sizes[b[0]][0] * sizes[b[0]][1] > max_pixels for b in buckets)  # the case is exercised
    # greedy: the next bucket's first sample would not have fitted into the previous bucket
    for prev, nxt in zip(buckets, buckets[1:]):
        first = sizes[nxt[0]][0] * sizes[nxt[0]][1]
        assert len(prev) == batch_size or first * (len(prev) + 1) > max_pixels
    # read order does not matter: sorted by (area, name)
    perm = list(range(len(sizes)))
    random.Random(9).shuffle(perm)
    shuffled = make_buckets([sizes[i] for i in perm], [names[i] for i in perm], batch_size=batch_size,
                            max_pixels=max_pixels)
    assert [[names[perm[i]] for i in b] for b in shuffled] == [[names[i] for i in b] for b in buckets]


def test_training_buckets_drop_and_count_long_captions_and_big_images():
    sizes = [(10, 10), (20, 20), (600, 600), (30, 30), (15, 15)]
    names = ["a", "b", "big", "long", "c"]
    lengths = [3, 4, 5, 250, 2]
    report = DataReport()
    buckets = make_buckets(sizes, names, batch_size=2, max_pixels=320_000, caption_lengths=lengths, max_len=200,
                           max_image_pixels=320_000, report=report, split="train")
    assert [[names[i] for i in b] for b in buckets] == [["a", "c"], ["b"]]
    assert report.count(REASON_TOO_LONG) == 1 and report.count(REASON_TOO_BIG) == 1
    assert report.num_filtered == 2 and report.num_skipped == 0


def test_bucket_example_by_hand():
    # areas 100, 100, 200, 300, 400 with max_pixels 600: [100, 100, 200] (200*3=600), then [300] (+400: 400*2 > 600)
    sizes = [(10, 10), (10, 10), (10, 20), (10, 30), (10, 40)]
    buckets = make_buckets(sizes, list("abcde"), batch_size=8, max_pixels=600)
    assert buckets == [[0, 1, 2], [3], [4]]
    assert make_buckets(sizes, list("abcde"), batch_size=2, max_pixels=10_000) == [[0, 1], [2, 3], [4]]


# --- sampler -----------------------------------------------------------------------------------------------------

def test_sampler_is_seeded_by_seed_and_epoch():
    a, b = BucketSampler(50, shuffle=True, seed=1), BucketSampler(50, shuffle=True, seed=1)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    a.set_epoch(1)
    assert list(a) != list(b)
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(BucketSampler(50, shuffle=True, seed=2)) != list(BucketSampler(50, shuffle=True, seed=1))
    assert list(BucketSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_sampler_set_start_skips_consumed_buckets():
    s = BucketSampler(20, shuffle=True, seed=4)
    s.set_epoch(3)
    full = list(s)
    s.set_start(7)
    assert list(s) == full[7:] and len(s) == 13
    s.set_epoch(4)  # a new epoch starts at its beginning
    assert len(s) == 20 and s.start == 0
    state = {"epoch": 3, "start": 7, "seed": 4}
    fresh = BucketSampler(20, shuffle=True, seed=0)
    fresh.load_state_dict(state)
    assert list(fresh) == full[7:] and fresh.state_dict() == state
    with pytest.raises(ValueError):
        s.set_start(21)


@pytest.mark.parametrize("num_buckets,world_size", [(10, 3), (9, 3), (2, 4), (1, 2), (17, 8)])
def test_sampler_shards_whole_buckets_across_ranks(num_buckets, world_size):
    shards = [BucketSampler(num_buckets, shuffle=True, seed=7, rank=r, world_size=world_size)
              for r in range(world_size)]
    for s in shards:
        s.set_epoch(2)
    orders = [list(s) for s in shards]
    assert len({len(o) for o in orders}) == 1 and all(len(o) == len(s) for o, s in zip(orders, shards))
    assert len(orders[0]) == math.ceil(num_buckets / world_size)
    assert set().union(*map(set, orders)) == set(range(num_buckets))
    single = BucketSampler(num_buckets, shuffle=True, seed=7)
    single.set_epoch(2)
    interleaved = [orders[r][k] for k in range(len(orders[0])) for r in range(world_size)]
    assert interleaved[:num_buckets] == list(single)  # rank r takes positions r, r+W, ... of the epoch order


# --- transforms --------------------------------------------------------------------------------------------------

def _cv2_linear_reference(img: np.ndarray, fx: float, fy: float) -> np.ndarray:
    """cv2.resize(img, None, fx=fx, fy=fy, interpolation=INTER_LINEAR) in float, written out from its definition:
    dsize = round(size * f), source coordinate (d + 0.5) / f - 0.5, clamped at the borders."""
    in_h, in_w = img.shape
    out_h, out_w = round(in_h * fy), round(in_w * fx)

    def taps(n_out: int, n_in: int, f: float):
        src = (np.arange(n_out) + 0.5) / f - 0.5
        lo = np.floor(src).astype(int)
        frac = src - lo
        frac[lo < 0], lo[lo < 0] = 0.0, 0
        at_end = lo >= n_in - 1
        frac[at_end], lo[at_end] = 0.0, n_in - 1
        return lo, np.minimum(lo + 1, n_in - 1), frac

    y0, y1, wy = taps(out_h, in_h, fy)
    x0, x1, wx = taps(out_w, in_w, fx)
    img = img.astype(np.float64)
    top = img[y0][:, x0] * (1 - wx) + img[y0][:, x1] * wx
    bottom = img[y1][:, x0] * (1 - wx) + img[y1][:, x1] * wx
    return top * (1 - wy)[:, None] + bottom * wy[:, None]


@pytest.mark.parametrize("scale", [0.5, 0.7, 0.913, 1.0, 1.37, 2.0, 3.3])
def test_resize_matches_cv2_inter_linear_definition(scale):
    img = _image(37, 53, seed=1).astype(np.float64) / 255.0
    img += np.random.default_rng(0).random(img.shape) * 0.3
    out = resize_like_cv2(torch.from_numpy(img).float()[None], scale, scale, quantize=False)[0].numpy()
    ref = _cv2_linear_reference(img, scale, scale)
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() < 1e-5
    eight_bit = torch.round(torch.from_numpy(img).float()[None] * 255) / 255
    quantized = resize_like_cv2(eight_bit, scale, scale)
    assert torch.equal(quantized, torch.round(quantized * 255) / 255)  # 8-bit levels, like cv2 on uint8


@pytest.mark.parametrize("hw", [(100, 300), (16, 16), (256, 1024), (300, 500), (8, 50), (40, 2000), (3, 3),
                                (2000, 2000), (1, 5000), (5000, 1), (10, 500), (300, 10), (1, 1)])
def test_scale_to_limit_range_output_is_in_range(hw):
    t = ScaleToLimitRange(w_lo=16, w_hi=1024, h_lo=16, h_hi=256)
    out = t(torch.rand(1, *hw))
    h, w = out.shape[-2:]
    assert 16 <= h <= 256 and 16 <= w <= 1024, (hw, out.shape)
    if 16 <= hw[0] <= 256 and 16 <= hw[1] <= 1024:
        assert (h, w) == hw
    elif 16 / 1024 <= hw[0] / hw[1] <= 256 / 16:  # CoMER's accepted ratios: uniform scale, ratio kept
        assert abs(h / w - hw[0] / hw[1]) < 0.05 * hw[0] / hw[1] + 1 / min(h, w)


def test_scale_to_limit_range_is_comer_for_ordinary_images():
    img = torch.from_numpy(_image(300, 500, seed=3).astype(np.float32) / 255)[None]
    out = ScaleToLimitRange()(img)
    assert out.shape == (1, 256, round(500 * 256 / 300))  # down by min(256/300, 1024/500)
    ref = _cv2_linear_reference(img[0].double().numpy(), 256 / 300, 256 / 300)
    assert np.abs(out[0].double().numpy() - ref).max() <= 0.5 / 255 + 1e-6


def test_scale_augmentation_uses_the_generator():
    aug = ScaleAugmentation(lo=0.7, hi=1.4)
    img = torch.rand(1, 100, 200)
    shapes = set()
    for seed in range(30):
        a = aug(img, torch.Generator().manual_seed(seed))
        b = aug(img, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)
        assert 70 <= a.shape[1] <= 140 and 140 <= a.shape[2] <= 280
        assert abs(a.shape[2] / a.shape[1] - 2) < 0.05
        shapes.add(tuple(a.shape))
    assert len(shapes) > 10


# --- loaders -----------------------------------------------------------------------------------------------------

def test_holdout_is_seeded_and_removed_from_training(tiny_roots, vocab):
    dir_root, _ = tiny_roots

    def names(seed: int) -> tuple[set[str], set[str]]:
        bundle = build_dataloaders(DataConfig(root=str(dir_root), val_holdout=8, num_workers=0), vocab, seed=seed)
        train = {n for bucket in bucket_names(bundle.train) for n in bucket}
        val = {n for bucket in bucket_names(bundle.val) for n in bucket}
        assert bundle.num_train_samples == 32 and bundle.num_val_samples == 8
        return train, val

    train_a, val_a = names(0)
    train_b, val_b = names(0)
    _, val_c = names(1)
    assert val_a == val_b and train_a == train_b and val_a != val_c
    assert not train_a & val_a and len(train_a | val_a) == 40


def test_limits_and_no_validation(tiny_roots, vocab):
    dir_root, _ = tiny_roots
    cfg = DataConfig(root=str(dir_root), val_split="test", train_limit=10, val_limit=5, num_workers=0)
    a, b = build_dataloaders(cfg, vocab, seed=0), build_dataloaders(cfg, vocab, seed=0)
    assert (a.num_train_samples, a.num_val_samples) == (10, 5)
    assert bucket_names(a.train) == bucket_names(b.train) and bucket_names(a.val) == bucket_names(b.val)
    bundle = build_dataloaders(DataConfig(root=str(dir_root), val_holdout=0, num_workers=0), vocab, seed=0)
    assert bundle.val is None and bundle.num_val_samples == 0 and bundle.num_train_samples == 40


def test_train_batches_are_padded_buckets_with_fixed_augmentation(tiny_roots, vocab):
    dir_root, _ = tiny_roots
    cfg = DataConfig(root=str(dir_root), val_split="test", batch_size=4, max_pixels=60_000, scale_aug=True,
                     num_workers=0)
    bundle = build_dataloaders(cfg, vocab, seed=11)
    sampler = bundle.train_sampler
    sampler.set_epoch(1)
    full = _batches(bundle.train)
    assert len(full) == len(sampler) == len(bucket_names(bundle.train))
    for batch in full:
        assert batch.images.dim() == 4 and batch.images.shape[0] == len(batch.tokens) <= 4
        assert batch.image_mask.shape == (batch.images.shape[0], *batch.images.shape[-2:])
        assert batch.image_mask.dtype == torch.bool and not batch.image_mask[:, 0, 0].any()
    # resume mid-epoch in a fresh process-like setup: the same buckets and the same augmented pixels
    resumed = build_dataloaders(cfg, vocab, seed=11)
    resumed.train_sampler.load_state_dict({"epoch": 1, "start": 3, "seed": 11})
    _assert_same_batches(full[3:], _batches(resumed.train))
    # another epoch: another order and other augmentation of the same buckets
    sampler.set_epoch(2)
    other = _batches(bundle.train)
    assert [b.names for b in other] != [b.names for b in full]
    assert sorted(map(tuple, (b.names for b in other))) == sorted(map(tuple, (b.names for b in full)))


def test_loading_leaves_the_global_rng_alone(tiny_roots, vocab):
    """Resume parity: restoring torch's RNG state mid-epoch must not be undone by the data pipeline."""
    dir_root, _ = tiny_roots
    bundle = build_dataloaders(DataConfig(root=str(dir_root), val_holdout=4, scale_aug=True, num_workers=0),
                               vocab, seed=0)
    state = torch.get_rng_state()
    _batches(bundle.train)
    _batches(bundle.val)
    assert torch.equal(state, torch.get_rng_state())


def test_bad_config_values_are_recipe_errors(tiny_roots, vocab):
    from hmerzoo.errors import RecipeError
    dir_root, _ = tiny_roots
    with pytest.raises(RecipeError, match=r"data\.batch_size: must be >= 1"):
        build_dataloaders(DataConfig(root=str(dir_root), batch_size=0), vocab, seed=0)
    with pytest.raises(DataError, match="val_holdout=40"):
        build_dataloaders(DataConfig(root=str(dir_root), val_holdout=40), vocab, seed=0)


def test_eval_loader_keeps_everything_in_fixed_order(tiny_roots, vocab):
    _, zip_root = tiny_roots
    loader = build_eval_loader(zip_root, "train", vocab, batch_size=3, max_pixels=10_000, scale_to_limit=True)
    batches = _batches(loader)
    names = [n for b in batches for n in b.names]
    assert sorted(names) == [f"s{i:03d}" for i in range(40)] and loader.dataset.num_samples == 40
    assert [b.names for b in _batches(loader)] == [b.names for b in batches]
    for b in batches:
        assert b.images.shape[-2] >= 16 and b.images.shape[-1] >= 16  # ScaleToLimitRange applied


def test_sample_root(sample_root: Path):
    full_vocab = Vocabulary.from_dictionary(str(sample_root / "dictionary.txt"))
    cfg = DataConfig(root=str(sample_root), val_split="2014", num_workers=0, scale_to_limit=True, scale_aug=True)
    bundle = build_dataloaders(cfg, full_vocab, seed=7)
    assert bundle.num_train_samples + bundle.report.num_filtered == 64
    assert bundle.num_val_samples == 32
    batch = next(iter(bundle.train))
    assert batch.images.dtype == torch.float32 and 0 <= batch.images.min() and batch.images.max() <= 1
    assert all(len(t) > 0 for t in batch.tokens)
    assert sum(len(b) for b in bundle.val) == 32


@pytest.mark.slow
def test_real_crohme_zips_header_only(crohme_root: Path):
    CROHME = crohme_root  # noqa: N806
    full_vocab = Vocabulary.from_dictionary(str(CROHME / "dictionary.txt"))
    start = time.perf_counter()
    train = CrohmeDataset(CROHME, "train", full_vocab)
    assert len(train) == 8835
    test = CrohmeDataset(CROHME, "2014", full_vocab)
    assert len(test) == 986
    report = DataReport()
    buckets = make_buckets(train.sizes, train.names, batch_size=8, max_pixels=320_000,
                           caption_lengths=train.caption_lengths, max_len=200, max_image_pixels=320_000,
                           report=report, split="train")
    seconds = time.perf_counter() - start
    kept = sum(len(b) for b in buckets)
    print(f"\ntrain: {len(train)} samples, {kept} kept in {len(buckets)} buckets "
          f"({report.num_filtered} filtered); 2014: {len(test)} samples; {seconds:.1f}s\n{report.summary()}")
    assert kept + report.num_filtered == 8835 and report.num_filtered < 20
    # CoMER's shipped checkpoint "epoch=151-step=57151" (4 GPUs) means 57,152 / 152 = 376 buckets per GPU per
    # epoch, i.e. 1,501 to 1,504 buckets in all with the same defaults
    assert 1501 <= len(buckets) <= 1504
    assert all(len(b) <= 8 for b in buckets)
    assert seconds < 30
