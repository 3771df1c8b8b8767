"""data.format: the hme100k and folder layouts, detection, and the one rule that picks a dataset class."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hmerzoo.config import DataConfig
from hmerzoo.data import (CrohmeDataset, FolderDataset, Hme100kDataset, build_dataloaders, build_eval_loader,
                          dataset_class, detect_format)
from hmerzoo.errors import DataError, RecipeError
from hmerzoo.vocab import Vocabulary

TOKENS = ["x", "+", "1", "y", "=", "2", "3", "\\frac", "{", "}"]


def _vocab() -> Vocabulary:
    return Vocabulary(["<pad>", "<sos>", "<eos>"] + TOKENS)


def _ink_photo(path, h=40, w=60, seed=0):
    """A colour photo of dark ink on light paper: beige paper ~ (225, 215, 190), dark blue stroke in rows 15-24,
    columns 10-49."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = (225, 215, 190)
    img = np.clip(img.astype(int) + rng.integers(-4, 5, img.shape), 0, 255).astype(np.uint8)
    img[15:25, 10:50] = (30, 30, 70)
    Image.fromarray(img, "RGB").save(path, quality=95)


def _crohme_image(path, h=30, w=50):
    """White ink on black, as CROHME's bmp files."""
    img = np.zeros((h, w), dtype=np.uint8)
    img[10:20, 5:45] = 255
    Image.fromarray(img, "L").save(path)


def _hme100k(root):
    for split, names in (("train", ["a", "b", "c"]), ("test", ["d"])):
        (root / f"{split}_images").mkdir(parents=True)
        lines = []
        for i, name in enumerate(names):
            _ink_photo(root / f"{split}_images" / f"{name}.jpg", h=40 + 4 * i, w=60 + 8 * i, seed=i)
            lines.append(f"{name}.jpg\tx + {i + 1}")
        (root / f"{split}_labels.txt").write_text("\n".join(lines) + "\n")
    return root


def _folder(root):
    (root / "train").mkdir(parents=True)
    _ink_photo(root / "train" / "p.png", seed=3)  # dark on light: inverted on load
    _crohme_image(root / "train" / "q.png")  # already white on black: left as is
    (root / "train" / "labels.tsv").write_text("p.png\t\\frac { x } { 2 }\nq\ty = 1\n")
    return root


def _crohme(root):
    (root / "train").mkdir(parents=True)
    _crohme_image(root / "train" / "e1.bmp")
    (root / "train" / "caption.txt").write_text("e1\tx = 2\n")
    return root


def test_hme100k_samples_tokens_and_polarity(tmp_path):
    root = _hme100k(tmp_path / "hme")
    ds = Hme100kDataset(root, "train", _vocab())
    assert ds.names == ["a.jpg", "b.jpg", "c.jpg"]
    assert ds.sizes == [(40, 60), (44, 68), (48, 76)]
    vocab = _vocab()
    assert [vocab.decode(r.ids) for r in ds.samples] == [["x", "+", "1"], ["x", "+", "2"], ["x", "+", "3"]]
    name, image, ids = ds[0]
    assert image.shape == (1, 40, 60) and image.dtype == torch.float32
    # ink bright, paper dark after loading: the stroke was the darkest part of a light photo
    assert float(image[0, 15:25, 10:50].mean()) > 0.9
    assert float(image[0, :10].mean()) < 0.1 and float(image[0, 30:].mean()) < 0.1
    assert len(Hme100kDataset(root, "test", vocab)) == 1


def test_hme100k_missing_split_names_the_splits(tmp_path):
    root = _hme100k(tmp_path / "hme")
    with pytest.raises(DataError, match=r"split 'val' not found.*splits found there: test, train"):
        Hme100kDataset(root, "val", _vocab())


def test_folder_labels_tsv_with_and_without_extensions(tmp_path):
    root = _folder(tmp_path / "f")
    ds = FolderDataset(root, "train", _vocab())
    assert ds.names == ["p.png", "q"]
    assert [r.image_file for r in ds.samples] == ["p.png", "q.png"]
    assert _vocab().decode(ds.samples[0].ids) == ["\\frac", "{", "x", "}", "{", "2", "}"]
    photo = ds.load_image(0)
    assert float(photo[0, 15:25, 10:50].mean()) > 0.9 and float(photo[0, :10].mean()) < 0.1
    # a CROHME-like image comes back exactly as the crohme reader gives it
    white_on_black = ds.load_image(1)
    expected = torch.zeros(1, 30, 50)
    expected[0, 10:20, 5:45] = 1.0
    assert torch.equal(white_on_black, expected)


def test_folder_caption_txt(tmp_path):
    root = tmp_path / "f"
    (root / "val").mkdir(parents=True)
    _ink_photo(root / "val" / "z.jpg")
    (root / "val" / "caption.txt").write_text("z\tx + y\n")
    ds = FolderDataset(root, "val", _vocab())
    assert ds.names == ["z"] and ds.caption_where.endswith("caption.txt")


def test_detection(tmp_path):
    assert detect_format(_hme100k(tmp_path / "hme")) == "hme100k"
    assert detect_format(_folder(tmp_path / "f")) == "folder"
    assert detect_format(_crohme(tmp_path / "c")) == "crohme"
    assert dataset_class(tmp_path / "hme") is Hme100kDataset
    assert dataset_class(tmp_path / "f") is FolderDataset
    assert dataset_class(tmp_path / "c") is CrohmeDataset
    # an explicit format or dataset is not second-guessed
    assert dataset_class(tmp_path / "c", "folder") is FolderDataset
    assert dataset_class(tmp_path / "hme", "auto", "crohme") is CrohmeDataset


def test_ambiguous_and_unknown_roots(tmp_path):
    root = _crohme(tmp_path / "both")
    _hme100k(root)
    with pytest.raises(DataError, match=r"ambiguous: it matches the formats crohme, hme100k; set data.format") as e:
        detect_format(root)
    assert str(root) in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no known dataset format found \(expected crohme: .*hme100k: .*folder: "):
        detect_format(tmp_path / "empty")
    with pytest.raises(RecipeError, match="data.format"):
        dataset_class(tmp_path / "empty", "hme100", None)


def test_training_and_eval_loaders_pick_the_format(tmp_path):
    root = _hme100k(tmp_path / "hme")
    cfg = DataConfig(root=str(root), val_split="test", num_workers=0, batch_size=2)
    bundle = build_dataloaders(cfg, _vocab(), seed=0)
    assert isinstance(bundle.train.dataset.dataset, Hme100kDataset)
    assert (bundle.num_train_samples, bundle.num_val_samples) == (3, 1)
    batch = next(iter(bundle.val))
    assert batch.names == ["d.jpg"] and float(batch.images[0, 0, 15:25, 10:50].mean()) > 0.9
    loader = build_eval_loader(_folder(tmp_path / "f"), "train", _vocab())
    assert isinstance(loader.dataset.dataset, FolderDataset) and loader.dataset.num_samples == 2


def test_data_vocab_and_check_read_the_format(tmp_path):
    from hmerzoo.data.check import check_root, token_counts, write_dictionary

    root = _hme100k(tmp_path / "hme")
    counts = token_counts(root)
    assert counts == {"x": 4, "+": 4, "1": 2, "2": 1, "3": 1}  # train a, b, c and test d
    write_dictionary(counts, root / "dictionary.txt")
    result = check_root(root)
    assert result.ok, result.problems
    assert {split: st.samples for split, st in result.stats.items()} == {"test": 1, "train": 3}
    folder = _folder(tmp_path / "f")
    assert token_counts(folder)["}"] == 2


def test_missing_dictionary_is_a_clear_error(tmp_path):
    from hmerzoo.builder import vocab_from_recipe

    root = _hme100k(tmp_path / "hme")
    with pytest.raises(DataError, match=r"vocab.dictionary: not set.*hmerzoo data vocab .*--out .*dictionary.txt"):
        vocab_from_recipe({"data": {"root": str(root)}})
    (root / "dictionary.txt").write_text("x\n+\n1\n")
    assert vocab_from_recipe({"data": {"root": str(root)}}).tokens[3:] == ["x", "+", "1"]


def test_recipe_check_names_an_unknown_format():
    from hmerzoo.recipe import load_recipe, validate_recipe

    validate_recipe(load_recipe("bttr", ["data.format=hme100k"]))
    with pytest.raises(RecipeError) as e:
        validate_recipe(load_recipe("bttr", ["data.format=hme100"]))
    expected = "data.format: unknown dataset 'hme100' (did you mean 'hme100k'?)"
    assert any(p.startswith(expected) for p in e.value.problems)


def test_folder_captions_in_raw_latex_are_tokenised(tmp_path):
    from hmerzoo.data.check import token_counts

    root = tmp_path / "f"
    (root / "train").mkdir(parents=True)
    for name in ("r", "s", "t"):
        _crohme_image(root / "train" / f"{name}.png")
    # raw LaTeX, already tokens, and tokens without the script braces (kept as written)
    (root / "train" / "labels.tsv").write_text("r\t\\frac{x}{2}+y^2\ns\tx + 1\nt\t$x_1$\n")
    ds = FolderDataset(root, "train", Vocabulary(["<pad>", "<sos>", "<eos>"] + TOKENS + ["^", "_"]))
    assert [ds.vocab.decode(r.ids) for r in ds.samples] == [
        ["\\frac", "{", "x", "}", "{", "2", "}", "+", "y", "^", "{", "2", "}"], ["x", "+", "1"],
        ["x", "_", "{", "1", "}"]]
    assert token_counts(root) == {"x": 3, "{": 4, "}": 4, "\\frac": 1, "2": 2, "+": 2, "y": 1, "^": 1, "1": 2,
                                  "_": 1}


def test_training_vocabulary_comes_from_the_labels_without_a_dictionary(tmp_path):
    from hmerzoo.data.check import labels_vocabulary

    root = _hme100k(tmp_path / "hme")
    vocab = labels_vocabulary({"data": {"root": str(root)}})
    # every split's tokens (train a, b, c and test d), sorted, after the specials
    assert vocab.tokens == ["<pad>", "<sos>", "<eos>", "+", "1", "2", "3", "x"]
    assert labels_vocabulary({"data": {"root": str(root)}, "vocab": {"specials": ["<eos>", "<sos>"],
                              "roles": {"pad": "<eos>"}}}).tokens[:3] == ["<eos>", "<sos>", "+"]
    # a dictionary (the recipe's or the root's) decides instead; CROHME roots never guess
    assert labels_vocabulary({"data": {"root": str(root)}, "vocab": {"dictionary": "d.txt"}}) is None
    assert labels_vocabulary({"data": {"root": str(_crohme(tmp_path / "c"))}}) is None
    (root / "dictionary.txt").write_text("x\n+\n1\n2\n3\n")
    assert labels_vocabulary({"data": {"root": str(root)}}) is None


def test_a_training_run_on_an_hme100k_root_without_a_dictionary(tmp_path):
    from test_trainer import quiet, toy_recipe  # its toy encoder and decoder (registered on import)

    from hmerzoo import load_model, training

    root = _hme100k(tmp_path / "hme")
    recipe = toy_recipe(tmp_path, "run", max_steps=2, val_every=0)
    del recipe["vocab"]
    recipe["data"] = {"root": str(root), "val_split": "test", "num_workers": 0, "batch_size": 2}
    run_dir = training.train(recipe, console=quiet())
    # the model keeps the vocabulary read off the labels: evaluating it needs no dictionary either
    assert load_model(run_dir).vocab.tokens == ["<pad>", "<sos>", "<eos>", "+", "1", "2", "3", "x"]
