import pytest
import torch
from safetensors.torch import save_file

from hmerzoo import build_model, load_model
from hmerzoo.errors import CheckpointError, RecipeError
from hmerzoo.recipe import dump_recipe


def dictionary(tmp_path, n=110):
    path = tmp_path / "dictionary.txt"
    path.write_text("\n".join(f"tok{i}" for i in range(n)) + "\n")
    return path


def test_bttr_recipe_builds_the_official_parameter_count(tmp_path):
    # 110 dictionary symbols + <pad> <sos> <eos> = 113 classes, as the official BTTR: 6,375,425 parameters
    model = build_model("bttr", [f"vocab.dictionary={dictionary(tmp_path)}"])
    assert model.num_parameters() == 6_375_425
    assert len(model.vocab) == 113 and (model.vocab.pad_id, model.vocab.sos_id, model.vocab.eos_id) == (0, 1, 2)
    # injected sizes
    assert model.neck.out_channels == 256 and model.encoder.out_channels == 684
    assert model.decoder.proj.out_features == 113


def test_vocab_from_data_root(tmp_path):
    dictionary(tmp_path, 20)
    model = build_model("bttr", [f"data.root={tmp_path}"])
    assert len(model.vocab) == 23


def test_no_dictionary_and_no_root_is_a_clear_error(monkeypatch, tmp_path):
    # with no data.root the default root is used (tests/test_data_root.py); where none exists, the error says how
    # to get one
    import hmerzoo.config
    from hmerzoo.errors import DataError

    monkeypatch.delenv("HMERZOO_DATA", raising=False)
    monkeypatch.setenv("HMERZOO_HOME", str(tmp_path))
    monkeypatch.setattr(hmerzoo.config, "repo_data_root", lambda: tmp_path / "none")
    with pytest.raises(DataError, match="hmerzoo data fetch crohme"):
        build_model("bttr")


def test_conflicting_injected_value_is_an_error(tmp_path):
    with pytest.raises(RecipeError, match="model.decoder.vocab_size: set to 50 but the model needs 113"):
        build_model("bttr", [f"vocab.dictionary={dictionary(tmp_path)}", "model.decoder.vocab_size=50"])


def test_forward_returns_loss_and_named_losses(tmp_path):
    from hmerzoo.batch import Batch, pad_images

    model = build_model("bttr", [f"vocab.dictionary={dictionary(tmp_path, 10)}", "model.encoder.growth_rate=4",
                                 "model.encoder.num_layers=2"])
    images, mask = pad_images([torch.rand(1, 40, 60), torch.rand(1, 32, 80)])
    out = model(Batch(images, mask, [[3, 4, 5], [6]], ["a", "b"]))
    assert set(out["losses"]) == {"ce"} and out["loss"].ndim == 0
    out["loss"].backward()
    # teacher-forced rows: 2 L2R + 2 R2L, length max(3, 1) + 1
    assert out["output"].logits.shape == (4, 4, 13)


SMALL = ["model.encoder.growth_rate=4", "model.encoder.num_layers=2"]


def small_run_directory(tmp_path):
    """A tiny BTTR and a directory holding its recipe and vocabulary, but no weights yet."""
    model = build_model("bttr", [f"vocab.dictionary={dictionary(tmp_path, 10)}", *SMALL])
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(dump_recipe(model.recipe))
    model.vocab.save(str(run / "vocab.json"))
    return model, run


def test_load_model_round_trip_and_wrong_vocabulary(tmp_path):
    model, run = small_run_directory(tmp_path)
    save_file(model.state_dict(), str(run / "model.safetensors"))
    loaded = load_model(run)
    assert not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])
    # weights of a model with another vocabulary
    other = build_model("bttr", [f"vocab.dictionary={dictionary(tmp_path / '..', 12)}", *SMALL])
    save_file(other.state_dict(), str(run / "model.safetensors"))
    with pytest.raises(CheckpointError, match="belong to another model or vocabulary.*other shapes"):
        load_model(run)


def test_load_model_without_recipe_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no recipe.yaml"):
        load_model(tmp_path)


def test_load_model_reads_the_weights_of_a_run_directory(tmp_path):
    from hmerzoo.checkpoint import checkpoint_at, save_weights

    model, run = small_run_directory(tmp_path)
    with pytest.raises(CheckpointError, match="no weights found"):
        load_model(run)
    save_weights(checkpoint_at(run, 3).weights, {k: torch.zeros_like(v) for k, v in model.state_dict().items()})
    save_weights(checkpoint_at(run, 12).weights, model.state_dict())  # the newest step wins
    loaded = load_model(run)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    # a damaged weights file: the message names it (read through checkpoint.load_weights)
    (run / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match=f"{run / 'model.safetensors'}: cannot read the weights"):
        load_model(run)
