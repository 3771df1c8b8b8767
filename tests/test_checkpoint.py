"""Checkpoint files: atomic writes, complete pairs, pruning, best, RNG states, weights_only loading."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from hmerzoo import checkpoint as ckpt_mod
from hmerzoo.checkpoint import (atomic_write, atomic_write_text, capture_rng_state, checkpoint_at, latest_checkpoint,
                                list_checkpoints, load_trainer_state, load_weights, read_best, resolve_checkpoint,
                                restore_rng_state, save_best, save_checkpoint)
from hmerzoo.errors import CheckpointError


def model_state(value: float) -> dict[str, torch.Tensor]:
    return {"layer.weight": torch.full((3, 2), value), "layer.bias": torch.zeros(3)}


def trainer_state(step: int) -> dict:
    param = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([param], lr=0.1, momentum=0.9)
    param.grad = torch.ones(2)
    opt.step()
    return {"step": step, "epoch": 0, "position": step, "optimizer": opt.state_dict(), "best": {"value": None},
            "rng": capture_rng_state()}


def test_pair_roundtrip_and_weights_only(tmp_path):
    saved = save_checkpoint(tmp_path, 12, model_state(1.5), trainer_state(12))
    assert saved.weights.name == "step-00000012.safetensors"
    assert saved.trainer_state.name == "step-00000012.trainer.pt"
    state = torch.load(saved.trainer_state, weights_only=True)  # no pickled code needed
    assert state["step"] == 12 and "momentum_buffer" in state["optimizer"]["state"][0]
    assert torch.equal(load_weights(saved.weights)["layer.weight"], torch.full((3, 2), 1.5))
    assert latest_checkpoint(tmp_path) == saved
    assert resolve_checkpoint(saved.weights) == saved
    assert resolve_checkpoint(saved.trainer_state) == saved
    assert resolve_checkpoint(tmp_path) == saved


def test_latest_ignores_incomplete_pair(tmp_path):
    good = save_checkpoint(tmp_path, 5, model_state(1.0), trainer_state(5))
    # A crash after the weights of step 9 and before its trainer state: the pair is not complete.
    ckpt_mod.save_weights(checkpoint_at(tmp_path, 9).weights, model_state(2.0))
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_checkpoint(checkpoint_at(tmp_path, 9).weights)


def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    good = save_checkpoint(tmp_path, 1, model_state(1.0), trainer_state(1))
    before = good.trainer_state.read_bytes(), good.weights.read_bytes()

    def dying_save(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model_state(3.0), trainer_state(2), keep_last=1)
    monkeypatch.undo()
    # The new pair never completed, so resume still finds the previous one, untouched and not pruned.
    assert latest_checkpoint(tmp_path) == good
    assert (good.trainer_state.read_bytes(), good.weights.read_bytes()) == before
    assert torch.load(good.trainer_state, weights_only=True)["step"] == 1
    assert [p.name for p in good.weights.parent.iterdir() if p.name.startswith(".tmp-")] == []  # no temp file left
    assert not checkpoint_at(tmp_path, 2).trainer_state.exists()


def test_interrupted_weights_write_keeps_previous_file(tmp_path, monkeypatch):
    good = save_checkpoint(tmp_path, 3, model_state(1.0), trainer_state(3))
    before = good.weights.read_bytes()
    import safetensors.torch

    def dying_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\x00" * 10)
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of the write

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save_file)
    with pytest.raises(KeyboardInterrupt):
        ckpt_mod.save_weights(good.weights, model_state(5.0))
    monkeypatch.undo()
    assert good.weights.read_bytes() == before
    assert torch.equal(load_weights(good.weights)["layer.weight"], torch.full((3, 2), 1.0))


def test_atomic_write_failure_midway_keeps_text(tmp_path):
    path = tmp_path / "recipe.yaml"
    atomic_write_text(path, "first")

    def half_write(tmp):
        tmp.write_text("sec")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(path, half_write)
    assert path.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_keep_last_prunes_oldest_pairs_and_stale_files(tmp_path):
    ckpt_mod.save_weights(checkpoint_at(tmp_path, 1).weights, model_state(0.0))  # incomplete leftover
    (tmp_path / "checkpoints" / ".tmp-step-00000002.safetensors.123.abcd").write_bytes(b"x")  # crash leftover
    for step in (2, 4, 6, 8):
        save_checkpoint(tmp_path, step, model_state(float(step)), trainer_state(step), keep_last=2)
    assert [c.step for c in list_checkpoints(tmp_path)] == [6, 8]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000006.safetensors", "step-00000006.trainer.pt",
                     "step-00000008.safetensors", "step-00000008.trainer.pt"]


def test_keep_last_zero_keeps_all(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model_state(1.0), trainer_state(step), keep_last=0)
    assert [c.step for c in list_checkpoints(tmp_path)] == [1, 2, 3]


def test_best_weights_and_record(tmp_path):
    assert read_best(tmp_path) is None
    save_best(tmp_path, model_state(1.0), "val/exprate", 0.25, step=10, epoch=1)
    save_best(tmp_path, model_state(2.0), "val/exprate", 0.5, step=20, epoch=3)
    assert read_best(tmp_path) == {"monitor": "val/exprate", "value": 0.5, "step": 20, "epoch": 3}
    assert torch.equal(load_weights(tmp_path / "checkpoints" / "best.safetensors")["layer.weight"],
                       torch.full((3, 2), 2.0))
    with pytest.raises(CheckpointError, match="no trainer state"):
        resolve_checkpoint(tmp_path / "checkpoints" / "best.safetensors")


def test_tied_weights_are_saved(tmp_path):
    shared = torch.randn(4, 3)
    ckpt_mod.save_weights(tmp_path / "w.safetensors", {"a": shared, "b": shared, "c": shared.t()})
    loaded = load_weights(tmp_path / "w.safetensors")
    assert torch.equal(loaded["a"], shared) and torch.equal(loaded["b"], shared)
    assert torch.equal(loaded["c"], shared.t())


def test_rng_states_roundtrip_through_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # leaves a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    torch.save(state, tmp_path / "rng.pt")
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    restore_rng_state(load_trainer_state(tmp_path / "rng.pt"))
    again = (random.random(), np.random.normal(), np.random.rand(), torch.rand(3))
    assert expected[:3] == again[:3]
    assert torch.equal(expected[3], again[3])


def test_corrupt_files_raise_checkpoint_error(tmp_path):
    bad = tmp_path / "step-00000001.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read the weights"):
        load_weights(bad)
    (tmp_path / "step-00000001.trainer.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read the trainer state"):
        load_trainer_state(tmp_path / "step-00000001.trainer.pt")


def test_find_weights_prefers_the_model_file_then_best_then_the_newest_step(tmp_path):
    from hmerzoo.checkpoint import BEST_WEIGHTS, WEIGHTS_FILE, checkpoint_dir, find_weights, save_weights

    with pytest.raises(CheckpointError, match="no weights found .looked for model.safetensors, "
                                              "checkpoints/best.safetensors, checkpoints/step-.\\.safetensors"):
        find_weights(tmp_path)
    save_checkpoint(tmp_path, 9, model_state(1.0), trainer_state(9))
    save_weights(checkpoint_at(tmp_path, 10).weights, model_state(2.0))  # its trainer state not written yet
    assert find_weights(tmp_path) == checkpoint_at(tmp_path, 10).weights  # weights are enough to evaluate
    save_weights(checkpoint_dir(tmp_path) / BEST_WEIGHTS, model_state(3.0))
    assert find_weights(tmp_path) == checkpoint_dir(tmp_path) / BEST_WEIGHTS
    save_weights(tmp_path / WEIGHTS_FILE, model_state(4.0))
    assert find_weights(tmp_path) == tmp_path / WEIGHTS_FILE
    assert find_weights(checkpoint_at(tmp_path, 9).weights) == checkpoint_at(tmp_path, 9).weights  # a file: itself


def test_find_model_dir_looks_up_from_a_weights_file(tmp_path):
    from hmerzoo.checkpoint import RECIPE_FILE, find_model_dir

    with pytest.raises(CheckpointError, match="no recipe.yaml here or in the folders above"):
        find_model_dir(tmp_path)
    (tmp_path / RECIPE_FILE).write_text("name: x\n")
    assert find_model_dir(tmp_path / "checkpoints") == tmp_path
