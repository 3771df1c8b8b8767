"""The bad-input catalogue (docs/errors.md): every user mistake ends in one clear message.

Each test runs the command line in-process (``hmerzoo.cli.main``) and checks: exit status 2, one ``error:`` message
naming the file / key / line and what to do, no Python traceback (unless ``--debug``), and that what was already
written (an existing run directory) is untouched.
"""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image

import hmerzoo
from hmerzoo import cli
from hmerzoo.builder import WEIGHTS_FILE, build_model
from hmerzoo.checkpoint import latest_checkpoint, list_checkpoints, load_weights, save_weights
from hmerzoo.data.bucketing import make_buckets
from hmerzoo.errors import CheckpointError, DataError, HmerzooError
from hmerzoo.model import HMERModel
from hmerzoo.vocab import Vocabulary

NUM_SAMPLES = 10

TINY_RECIPE = """\
extends: bttr
name: tiny
seed: 5
data:
  root: {root}
  batch_size: 4
  max_pixels: 40000
  max_image_pixels: 40000
  num_workers: 0
  val_holdout: 0
model:
  encoder: {{type: densenet, growth_rate: 4, num_layers: 2}}
  neck: {{type: bttr_projection, d_model: 32}}
  decoder: {{type: bttr, d_model: 32, nhead: 2, num_layers: 1, dim_feedforward: 64, dropout: 0.3}}
sched: {{type: cosine, warmup_steps: 1}}
train:
  epochs: 10
  max_steps: 2
  ckpt_every: 1
  keep_last: 0
  val_every: 0
  log_every: 1
  device: cpu
  num_threads: 1
  run_dir: {run_dir}
"""


# --- helpers ----------------------------------------------------------------------------------------------------
@pytest.fixture
def data_root(tmp_path, sample_root) -> Path:
    """A small copy of the CROHME sample (the NUM_SAMPLES smallest training images) that tests may damage."""
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    shutil.copy(sample_root / "dictionary.txt", root / "dictionary.txt")
    lines = (sample_root / "train" / "caption.txt").read_text().splitlines()
    sizes = {}
    for line in lines:
        name = line.split("\t")[0]
        with Image.open(sample_root / "train" / f"{name}.bmp") as img:
            sizes[name] = img.size[0] * img.size[1]
    keep = sorted(lines, key=lambda line: (sizes[line.split("\t")[0]], line))[:NUM_SAMPLES]
    for line in keep:
        name = line.split("\t")[0]
        shutil.copy(sample_root / "train" / f"{name}.bmp", root / "train" / f"{name}.bmp")
    (root / "train" / "caption.txt").write_text("\n".join(keep) + "\n")
    return root


@pytest.fixture
def recipe(tmp_path, data_root) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_RECIPE.format(root=data_root, run_dir=tmp_path / "run"))
    return path


def hmerzoo_cli(capsys, *args) -> tuple[int, str]:
    """Run the command line in-process; (exit status, stdout + stderr)."""
    capsys.readouterr()
    status = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def assert_clean_error(status: int, output: str, *fragments: str) -> str:
    """Exit status 2, exactly one error message, no traceback, and every fragment in the message."""
    assert status == 2, output
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    message = output[output.index("error:"):]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    return message


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run_dir(capsys, recipe, tmp_path) -> Path:
    """A finished run (steps 1 and 2 checkpointed) of the tiny recipe: what the failing commands must not harm."""
    status, output = hmerzoo_cli(capsys, "train", recipe)
    assert status == 0, output
    run = tmp_path / "run"
    assert [c.step for c in list_checkpoints(run)] == [1, 2]
    return run


def caption_lines(data_root: Path) -> list[str]:
    return (data_root / "train" / "caption.txt").read_text().splitlines()


# --- data ---------------------------------------------------------------------------------------------------------
def test_corrupt_image_names_caption_line_and_file(capsys, recipe, data_root, run_dir):
    before = snapshot(run_dir)
    name = caption_lines(data_root)[2].split("\t")[0]
    (data_root / "train" / f"{name}.bmp").write_bytes(b"this is not a bitmap")
    status, output = hmerzoo_cli(capsys, "train", recipe, "--resume", "auto")
    assert_clean_error(status, output, "caption.txt:3:", f"{name}.bmp", "cannot read the image", "data.skip_bad=true")
    assert snapshot(run_dir) == before


def test_corrupt_pixels_in_a_worker_give_the_plain_message(capsys, recipe, data_root):
    # The header reads (so the split opens), the pixel data is cut off: the error comes from a DataLoader worker,
    # which wraps it in its own traceback text - the user sees the original message only.
    name = caption_lines(data_root)[0].split("\t")[0]
    path = data_root / "train" / f"{name}.bmp"
    path.write_bytes(path.read_bytes()[:100])
    status, output = hmerzoo_cli(capsys, "train", recipe, "data.num_workers=1")
    message = assert_clean_error(status, output, "caption.txt:1:", f"{name}.bmp", "data.skip_bad=true")
    assert "DataLoader worker" not in message and "Original" not in message


def test_corrupt_image_skipped_with_skip_bad(capsys, recipe, data_root):
    name = caption_lines(data_root)[2].split("\t")[0]
    (data_root / "train" / f"{name}.bmp").write_bytes(b"garbage")
    status, output = hmerzoo_cli(capsys, "train", recipe, "data.skip_bad=true")
    assert status == 0, output
    assert "unreadable image: 1 skipped" in output


def test_truncated_zip(capsys, recipe, data_root, run_dir):
    before = snapshot(run_dir)
    with zipfile.ZipFile(data_root / "train.zip", "w") as zf:
        for path in sorted((data_root / "train").iterdir()):
            zf.write(path, f"train/{path.name}")
    shutil.rmtree(data_root / "train")
    data = (data_root / "train.zip").read_bytes()
    (data_root / "train.zip").write_bytes(data[: len(data) // 2])  # an interrupted download
    status, output = hmerzoo_cli(capsys, "train", recipe, "--resume", "auto")
    assert_clean_error(status, output, "train.zip", "cannot open the zip file", "damaged or incomplete",
                       "download or copy it again")
    assert snapshot(run_dir) == before


def test_caption_with_unknown_token(capsys, recipe, data_root, run_dir):
    before = snapshot(run_dir)
    lines = caption_lines(data_root)
    lines[4] = lines[4] + " \\unknowntoken"
    (data_root / "train" / "caption.txt").write_text("\n".join(lines) + "\n")
    status, output = hmerzoo_cli(capsys, "train", recipe, "--resume", "auto")
    assert_clean_error(status, output, "caption.txt:5:", "\\unknowntoken", "add it to the dictionary or fix the "
                       "caption", "data.skip_bad=true")
    assert snapshot(run_dir) == before


def test_empty_caption(capsys, recipe, data_root, run_dir):
    before = snapshot(run_dir)
    lines = caption_lines(data_root)
    name = lines[1].split("\t")[0]
    lines[1] = name + "\t"
    (data_root / "train" / "caption.txt").write_text("\n".join(lines) + "\n")
    status, output = hmerzoo_cli(capsys, "train", recipe, "--resume", "auto")
    assert_clean_error(status, output, "caption.txt:2:", f"'{name}' has an empty caption", "data.skip_bad=true")
    assert snapshot(run_dir) == before


def test_missing_data_root(capsys, recipe, tmp_path, run_dir):
    before = snapshot(run_dir)
    missing = tmp_path / "no-such-data"
    status, output = hmerzoo_cli(capsys, "train", recipe, f"data.root={missing}", "--resume", "auto")
    assert_clean_error(status, output, f"data root '{missing}' does not exist", "data.root=DIR")
    assert snapshot(run_dir) == before


def test_images_larger_than_max_image_pixels_are_dropped_and_reported(capsys, recipe, data_root):
    areas = sorted(w * h for w, h in (Image.open(p).size for p in (data_root / "train").glob("*.bmp")))
    limit = areas[-3]  # the two largest images are over it
    status, output = hmerzoo_cli(capsys, "train", recipe, f"data.max_image_pixels={limit}")
    assert status == 0, output
    assert f"{NUM_SAMPLES - 2} training" in output
    assert "image larger than data.max_image_pixels: 2 filtered" in output


def test_every_image_too_large(capsys, recipe, run_dir):
    before = snapshot(run_dir)
    status, output = hmerzoo_cli(capsys, "train", recipe, "data.max_image_pixels=100", "--resume", "auto")
    assert_clean_error(status, output, "no training samples left", "data.max_image_pixels=100", "raise these limits",
                       f"image larger than data.max_image_pixels: {NUM_SAMPLES} filtered")
    assert snapshot(run_dir) == before


def test_image_larger_than_max_pixels_gets_a_bucket_of_its_own():
    # Within data.max_image_pixels (training) or anywhere (evaluation), an image over the per-batch budget
    # data.max_pixels is never dropped: it is trained / decoded alone.
    sizes = [(10, 10), (10, 12), (100, 100), (10, 11)]
    buckets = make_buckets(sizes, ["a", "b", "big", "c"], batch_size=4, max_pixels=1000, max_image_pixels=20000)
    assert buckets == [[0, 3, 1], [2]]


# --- recipes --------------------------------------------------------------------------------------------------------
def test_wrong_type_in_an_override(capsys, recipe, run_dir):
    before = snapshot(run_dir)
    status, output = hmerzoo_cli(capsys, "train", recipe, "train.max_steps=many", "--resume", "auto")
    assert_clean_error(status, output, f"recipe {recipe}", "train.max_steps: expected int or null, got str 'many'")
    assert snapshot(run_dir) == before


def test_wrong_type_in_the_recipe_file(capsys, recipe, run_dir):
    before = snapshot(run_dir)
    recipe.write_text(recipe.read_text().replace("batch_size: 4", 'batch_size: "four"'))
    status, output = hmerzoo_cli(capsys, "train", recipe, "--resume", "auto")
    assert_clean_error(status, output, str(recipe), "data.batch_size: expected int, got str 'four'")
    assert snapshot(run_dir) == before


def test_invalid_yaml_names_line_and_column(capsys, recipe):
    recipe.write_text(recipe.read_text().replace("  epochs: 10", "  epochs: [10"))
    status, output = hmerzoo_cli(capsys, "config", "validate", recipe)
    assert_clean_error(status, output, f"{recipe}:", "invalid YAML")


def test_unknown_key(capsys, recipe, run_dir):
    before = snapshot(run_dir)
    status, output = hmerzoo_cli(capsys, "train", recipe, "train.max_step=3", "--resume", "auto")
    assert_clean_error(status, output, "train.max_step: unknown key", "did you mean 'max_steps'")
    assert snapshot(run_dir) == before


def test_unknown_component(capsys, recipe, run_dir):
    before = snapshot(run_dir)
    status, output = hmerzoo_cli(capsys, "train", recipe, "model.encoder.type=densenett", "--resume", "auto")
    assert_clean_error(status, output, "model.encoder.type: unknown encoder 'densenett'", "did you mean 'densenet'?",
                       "Registered encoders:")
    assert snapshot(run_dir) == before


def test_component_argument_out_of_range(capsys, recipe):
    status, output = hmerzoo_cli(capsys, "train", recipe, "model.encoder.num_blocks=0")
    assert_clean_error(status, output, "model.encoder: cannot build densenet", "num_blocks",
                       "fix the arguments under model.encoder")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_cuda_asked_for_but_absent(capsys, recipe, run_dir):
    before = snapshot(run_dir)
    status, output = hmerzoo_cli(capsys, "train", recipe, "train.device=cuda", "--resume", "auto")
    assert_clean_error(status, output, "train.device=cuda: CUDA is not available", "use train.device=cpu")
    assert snapshot(run_dir) == before


def test_run_directory_that_cannot_be_created(capsys, recipe, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    status, output = hmerzoo_cli(capsys, "train", recipe, f"train.run_dir={blocker / 'run'}")
    assert_clean_error(status, output, str(blocker))


# --- checkpoints ------------------------------------------------------------------------------------------------
OTHER_MODEL = ["model.neck.d_model=48", "model.decoder.d_model=48"]


def test_resume_from_a_checkpoint_of_another_model(capsys, recipe, run_dir, tmp_path):
    before = snapshot(run_dir)
    other_run = tmp_path / "other"
    status, output = hmerzoo_cli(capsys, "train", recipe, *OTHER_MODEL, f"train.run_dir={other_run}",
                                 "--resume", latest_checkpoint(run_dir).weights)
    assert_clean_error(status, output, "step-00000002.safetensors", "belong to another model or vocabulary",
                       "with the recipe and vocabulary they were trained with")
    assert not other_run.exists()  # nothing written for the run that could not start
    assert snapshot(run_dir) == before


def test_resume_auto_with_a_changed_model_keeps_the_run_recipe(capsys, recipe, run_dir):
    before = snapshot(run_dir)
    status, output = hmerzoo_cli(capsys, "train", recipe, *OTHER_MODEL, "--resume", "auto")
    assert_clean_error(status, output, "belong to another model or vocabulary")
    assert snapshot(run_dir) == before  # recipe.yaml still describes the checkpoints' model


def test_predict_with_weights_of_another_model(capsys, recipe, run_dir, data_root, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(run_dir, model_dir)
    other = build_model(hmerzoo.load_recipe(str(recipe), OTHER_MODEL))
    save_weights(model_dir / WEIGHTS_FILE, other.state_dict())
    image = next((data_root / "train").glob("*.bmp"))
    status, output = hmerzoo_cli(capsys, "predict", model_dir, image, "--device", "cpu")
    assert_clean_error(status, output, str(model_dir / WEIGHTS_FILE), "belong to another model or vocabulary")
    with pytest.raises(CheckpointError, match="belong to another model"):
        hmerzoo.load_model(model_dir)


def test_load_model_with_another_vocabulary(capsys, run_dir, data_root, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(run_dir, model_dir)
    dictionary = tmp_path / "dictionary.txt"
    dictionary.write_text((data_root / "dictionary.txt").read_text() + "\\newtoken\n")
    Vocabulary.from_dictionary(str(dictionary)).save(str(model_dir / "vocab.json"))
    with pytest.raises(CheckpointError, match=r"another model or vocabulary: .*other shapes"):
        hmerzoo.load_model(model_dir)
    image = next((data_root / "train").glob("*.bmp"))
    status, output = hmerzoo_cli(capsys, "predict", model_dir, image, "--device", "cpu")
    assert_clean_error(status, output, "belong to another model or vocabulary", "other shapes")


class Payload:
    """A custom class: unpickling it means importing and running code named by the file."""


class RunsCode:
    """Unpickling this creates a file: proof that code from a checkpoint ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_refuses_a_trainer_state_with_pickled_objects(capsys, recipe, run_dir, tmp_path):
    ckpt = latest_checkpoint(run_dir)
    state = torch.load(ckpt.trainer_state, weights_only=True)
    marker = tmp_path / "code-ran"
    state["extra"] = [Payload(), RunsCode(marker)]
    torch.save(state, ckpt.trainer_state)
    before = snapshot(run_dir)
    status, output = hmerzoo_cli(capsys, "train", recipe, "train.max_steps=3", "--resume", "auto")
    assert_clean_error(status, output, str(ckpt.trainer_state), "refused to load it",
                       "pickled Python objects (it asks to import ", "Payload)", "start a fresh run")
    assert not marker.exists()
    assert snapshot(run_dir) == before


def test_resume_from_a_damaged_trainer_state(capsys, recipe, run_dir):
    ckpt = latest_checkpoint(run_dir)
    ckpt.trainer_state.write_bytes(ckpt.trainer_state.read_bytes()[:300])  # damaged after it was written
    before = snapshot(run_dir)
    status, output = hmerzoo_cli(capsys, "train", recipe, "train.max_steps=3", "--resume", "auto")
    assert_clean_error(status, output, str(ckpt.trainer_state), "cannot read the trainer state",
                       "resume from another checkpoint")
    assert snapshot(run_dir) == before


def test_convert_refuses_a_checkpoint_with_pickled_objects(capsys, tmp_path, data_root):
    marker = tmp_path / "code-ran"
    official = tmp_path / "epoch=1.ckpt"
    torch.save({"state_dict": {"model.w": torch.zeros(2)}, "hyper_parameters": RunsCode(marker)}, official)
    out = tmp_path / "converted"
    status, output = hmerzoo_cli(capsys, "convert", "bttr", official, "--out", out,
                                 "--dictionary", data_root / "dictionary.txt")
    assert_clean_error(status, output, str(official), "refused to load it safely", "re-save only the weights")
    assert not marker.exists() and not out.exists()


# --- training -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
                                   RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 21474836480 bytes")],
                         ids=["cuda", "cpu"])
def test_out_of_memory_names_the_batch_and_the_settings(capsys, recipe, run_dir, monkeypatch, error):
    checkpoints = snapshot(run_dir / "checkpoints")

    def forward(self, batch):
        raise error

    monkeypatch.setattr(HMERModel, "forward", forward)
    status, output = hmerzoo_cli(capsys, "train", recipe, "train.max_steps=4", "--resume", "auto")
    message = assert_clean_error(status, output, "step 3: out of memory on cpu", "padded to", "Lower data.max_pixels",
                                 "(now 40000)", "data.batch_size (now 4)")
    names = {line.split("\t")[0] for line in caption_lines(Path(hmerzoo.load_recipe(str(recipe))["data"]["root"]))}
    assert any(name in message for name in names)
    assert snapshot(run_dir / "checkpoints") == checkpoints  # the last good checkpoint stays the latest


def nan_on_training_call(monkeypatch, bad_call: int) -> None:
    """Make the model's loss NaN on its ``bad_call``-th training forward."""
    original = HMERModel.forward
    calls = {"n": 0}

    def forward(self, batch):
        out = original(self, batch)
        if self.training:
            calls["n"] += 1
            if calls["n"] == bad_call:
                out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(HMERModel, "forward", forward)


def test_nonfinite_loss_stops_by_default(capsys, recipe, monkeypatch, tmp_path):
    nan_on_training_call(monkeypatch, 2)
    status, output = hmerzoo_cli(capsys, "train", recipe)
    assert_clean_error(status, output, "step 2: the loss is nan (not finite) on the batch of samples:",
                       "Lower optim.lr", "train.nonfinite=skip")
    assert [c.step for c in list_checkpoints(tmp_path / "run")] == [1]


def test_nonfinite_loss_skipped_and_counted(capsys, recipe, monkeypatch, tmp_path):
    nan_on_training_call(monkeypatch, 2)
    status, output = hmerzoo_cli(capsys, "train", recipe, "train.nonfinite=skip", "train.max_steps=3")
    assert status == 0, output
    assert "warning: step 2: the loss is nan on the batch of samples:" in output
    assert "1 batches skipped for a non-finite loss" in output
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if "lr" in r]
    assert [(r["step"], r["nonfinite_skipped"]) for r in train_lines] == [(1, 0), (2, 1), (3, 1)]
    assert train_lines[1]["loss"] is None and train_lines[2]["loss"] is not None
    assert records[-1] == {"step": 3, "epoch": 1, "nonfinite_skipped": 1}
    # The skipped step left every parameter as it was (BatchNorm statistics still follow the forward pass).
    params = {name for name, _ in build_model(hmerzoo.load_recipe(str(recipe))).named_parameters()}
    step1, step2 = (load_weights(c.weights) for c in list_checkpoints(run)[:2])
    assert all(torch.equal(step1[k], step2[k]) for k in params)
    # The count is part of the checkpoint: a resumed run goes on counting.
    monkeypatch.undo()
    status, output = hmerzoo_cli(capsys, "train", recipe, "train.nonfinite=skip", "train.max_steps=4",
                                 "--resume", "auto")
    assert status == 0, output
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1]) == {
        "step": 4, "epoch": 1, "nonfinite_skipped": 1}


def test_nonfinite_policy_is_checked(capsys, recipe):
    status, output = hmerzoo_cli(capsys, "train", recipe, "train.nonfinite=ignore")
    assert_clean_error(status, output, "train.nonfinite: expected one of error, skip, got 'ignore'")


# --- the command line itself ---------------------------------------------------------------------------------------
def test_debug_shows_the_traceback(recipe, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        cli.main(["--debug", "train", str(recipe), f"data.root={tmp_path / 'nowhere'}"])


def test_a_bug_prints_its_traceback_and_says_so(capsys, recipe, monkeypatch):
    import hmerzoo.recipe

    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(hmerzoo.recipe, "dump_recipe", broken)
    status, output = hmerzoo_cli(capsys, "config", "show", recipe)
    assert status == 1
    assert "Traceback" in output and "ZeroDivisionError" in output
    assert "error: unexpected ZeroDivisionError: this is a bug" in output
    with pytest.raises(ZeroDivisionError):
        cli.main(["--debug", "config", "show", str(recipe)])


class FailingDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise DataError("caption.txt:7: x.bmp: cannot read the image\nsecond line")


def test_errors_from_dataloader_workers_keep_their_own_message():
    # PyTorch re-raises a worker's exception with the worker's traceback in the message; the library user (not only
    # the command line) gets the original message and type.
    loader = torch.utils.data.DataLoader(FailingDataset(), num_workers=1)
    with pytest.raises(DataError) as error:
        next(iter(loader))
    assert str(error.value) == "caption.txt:7: x.bmp: cannot read the image\nsecond line"
    assert isinstance(error.value, HmerzooError)
