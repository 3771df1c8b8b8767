"""model.init_from / init_from_modules / freeze and train.unfreeze_at (hmerzoo/training/init_from.py), on a tiny
BTTR-shaped model trained on a few synthetic images."""
from __future__ import annotations

import io
import random
from pathlib import Path

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

from hmerzoo import build_model, training
from hmerzoo.checkpoint import latest_checkpoint, load_weights
from hmerzoo.errors import CheckpointError, RecipeError
from hmerzoo.recipe import validate_recipe
from hmerzoo.runtime import seed_everything
from hmerzoo.training.init_from import load_matching, prepare_model, report_table

TOKENS = ["x", "y", "+", "-", "2"]


def synthetic_image(rng: random.Random, height: int = 40, width: int = 88):
    """White strokes on black, like CROHME's bitmaps."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(2, 5)):
        x0, y0 = rng.randint(4, width - 20), rng.randint(4, height - 12)
        draw.line((x0, y0, x0 + rng.randint(6, 16), y0 + rng.randint(-6, 8)), fill=255, width=rng.randint(2, 3))
    return img


def tiny_root(root: Path, n: int = 8, seed: int = 0, captions: bool = True) -> Path:
    """A CROHME-layout root: train/<name>.bmp (+ caption.txt) and dictionary.txt."""
    rng = random.Random(seed)
    (root / "train").mkdir(parents=True, exist_ok=True)
    (root / "dictionary.txt").write_text("\n".join(TOKENS) + "\n")
    lines = []
    for i in range(n):
        synthetic_image(rng, 32 + 8 * (i % 3), 80 + 8 * (i % 4)).save(root / "train" / f"img{i}.bmp")
        lines.append(f"img{i}\t" + " ".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 4))))
    if captions:
        (root / "train" / "caption.txt").write_text("\n".join(lines) + "\n")
    return root


TINY_ENCODER = {"type": "densenet", "growth_rate": 4, "num_layers": 2, "dropout": 0.0}


def tiny_recipe(root: Path, run_dir: Path, **model) -> dict:
    return {
        "name": "tiny", "seed": 5,
        "data": {"root": str(root), "val_holdout": 0, "batch_size": 4, "num_workers": 0},
        "model": {"encoder": dict(TINY_ENCODER), "neck": {"type": "bttr_projection", "d_model": 16},
                  "decoder": {"type": "bttr", "d_model": 16, "nhead": 2, "num_layers": 1, "dim_feedforward": 32,
                              "dropout": 0.0}, **model},
        "optim": {"type": "adam", "lr": 0.01},
        "train": {"epochs": 50, "max_steps": 3, "val_every": 0, "log_every": 1, "device": "cpu",
                  "run_dir": str(run_dir)},
    }


def quiet() -> Console:
    return Console(file=io.StringIO(), width=200)


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("init_from")
    root = tiny_root(base / "data")
    run = training.train(tiny_recipe(root, base / "source"), console=quiet())
    return root, run


def test_weights_equal_the_source_and_the_table_names_what_was_skipped(tmp_path, source_run):
    root, run = source_run
    source = load_weights(latest_checkpoint(run).weights)
    # one more token: the decoder's embedding and output layer change shape and must be skipped
    other = tmp_path / "data"
    tiny_root(other)
    (other / "dictionary.txt").write_text("\n".join(TOKENS + ["z"]) + "\n")
    recipe = tiny_recipe(other, tmp_path / "run", init_from=str(run))
    model = build_model(recipe)
    report = prepare_model(model, recipe, None, lambda: 0)
    own = model.state_dict()
    mismatched = {k for k, _, _ in report.mismatched}
    assert mismatched and all(k.startswith("decoder.") for k in mismatched)
    assert set(report.loaded) == set(source) - mismatched
    for key in report.loaded:
        assert torch.equal(own[key], source[key]), key
    for key in mismatched:
        assert own[key].shape != source[key].shape
    console = quiet()
    console.print(report_table(report))
    text = console.file.getvalue()
    key = sorted(mismatched)[0]
    assert f"shape mismatch (kept as initialised): {key}" in text
    assert "encoder" in text and "decoder" in text


def test_init_from_modules_restricts_and_training_starts_from_the_source(tmp_path, source_run):
    root, run = source_run
    source = load_weights(latest_checkpoint(run).weights)
    recipe = tiny_recipe(root, tmp_path / "run", init_from=str(latest_checkpoint(run).weights),
                         init_from_modules=["encoder"])
    validate_recipe(recipe)
    model = build_model(recipe)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_matching(model, recipe["model"]["init_from"], ["encoder"])
    own = model.state_dict()
    assert report.loaded and all(k.startswith("encoder.") for k in report.loaded)
    assert report.not_selected and all(not k.startswith("encoder.") for k in report.not_selected)
    assert all(torch.equal(own[k], source[k]) for k in report.loaded)
    assert all(torch.equal(own[k], fresh[k]) for k in report.not_selected)
    # through the trainer: the table is printed and the run trains
    console = quiet()
    training.train(recipe, console=console)
    assert "not selected (model.init_from_modules)" in console.file.getvalue()


def test_nothing_matching_is_an_error_naming_the_file(tmp_path, source_run):
    root, _ = source_run
    path = tmp_path / "other.safetensors"
    save_file({"something.else": torch.zeros(3)}, str(path))
    model = build_model(tiny_recipe(root, tmp_path / "run"))
    with pytest.raises(CheckpointError, match=f"{path}: no tensor of this file matches"):
        load_matching(model, path)
    with pytest.raises(RecipeError, match="no module 'encodr'"):
        load_matching(model, path, ["encodr"])


def test_bad_model_options_are_reported(tmp_path, source_run):
    root, _ = source_run
    with pytest.raises(RecipeError, match="model.freeze: expected list"):
        validate_recipe(tiny_recipe(root, tmp_path / "run", freeze="encoder"))


def run_freeze(tmp_path: Path, root: Path, name: str, max_steps: int, unfreeze_at: int | None,
               resume: str | None = None) -> Path:
    recipe = tiny_recipe(root, tmp_path / name, freeze=["encoder"])
    recipe["train"].update(max_steps=max_steps, unfreeze_at=unfreeze_at, ckpt_every=1)
    return training.train(recipe, resume=resume, console=quiet())


def test_freeze_keeps_the_encoder_and_unfreeze_at_releases_it(tmp_path, source_run):
    root, _ = source_run
    seed_everything(5)  # the recipe's seed: the runs' initial weights
    initial = build_model(tiny_recipe(root, tmp_path / "x")).state_dict()
    frozen = load_weights(latest_checkpoint(run_freeze(tmp_path, root, "frozen", 3, None)).weights)
    for key, value in frozen.items():
        if key.startswith("encoder."):  # parameters and BatchNorm statistics alike
            assert torch.equal(value, initial[key]), key
    assert any(not torch.equal(v, initial[k]) for k, v in frozen.items() if k.startswith("decoder."))
    released = run_freeze(tmp_path, root, "released", 3, 2)
    at2 = load_weights(released / "checkpoints" / "step-00000002.safetensors")
    at3 = load_weights(latest_checkpoint(released).weights)
    assert all(torch.equal(at2[k], initial[k]) for k in at2 if k.startswith("encoder."))
    assert any(not torch.equal(at3[k], at2[k]) for k in at3 if k.startswith("encoder.") and "weight" in k)


def test_resume_across_unfreeze_is_exact(tmp_path, source_run):
    root, _ = source_run
    straight = latest_checkpoint(run_freeze(tmp_path, root, "straight", 4, 2))
    run_freeze(tmp_path, root, "resumed", 1, 2)
    resumed = latest_checkpoint(run_freeze(tmp_path, root, "resumed", 4, 2, resume="auto"))
    a, b = load_weights(straight.weights), load_weights(resumed.weights)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_init_from_null_trains_from_scratch_even_with_modules_named(tmp_path, source_run):
    root, _ = source_run
    recipe = tiny_recipe(root, tmp_path / "run", init_from=None, init_from_modules=["encoder"])
    validate_recipe(recipe)
    seed_everything(5)
    model = build_model(recipe)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    assert prepare_model(model, recipe, None, lambda: 0) is None
    assert all(torch.equal(v, fresh[k]) for k, v in model.state_dict().items())


def test_the_run_counts_frozen_parameters_as_not_trainable(tmp_path, source_run):
    root, _ = source_run
    recipe = tiny_recipe(root, tmp_path / "run", freeze=["encoder"])
    recipe["train"]["max_steps"] = 1
    console = quiet()
    training.train(recipe, console=console)
    model = build_model(recipe)
    expected = model.num_parameters() - sum(p.numel() for p in model.encoder.parameters())
    assert f"{expected:,} trainable parameters" in console.file.getvalue()
