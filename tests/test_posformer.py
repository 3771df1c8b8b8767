"""PosFormer: the converted official weights (a reduced configuration, tests/goldens/posformer, made by
tools/gen_posformer_goldens.py from the official code) reproduce the official features, word logits, level and
position logits, loss terms and the official beam search (CoMER's over the main decoder, whose coverage leaves out
the steps reading `{`, `^`, `_`); the position-forest codes and targets on hand-worked captions and on the official
labels of the recorded cases; the full default recipe has the official parameter count; the recipe trains; the
converter round-trips.

The goldens are committed, so nothing here needs ../shared.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import hmerzoo
from hmerzoo.batch import Batch
from hmerzoo.builder import build_model
from hmerzoo.convert import CONVERTERS, convert, convert_state_dict_posformer
from hmerzoo.convert.core import families_of
from hmerzoo.heads.position_forest import (ABOVE, BELOW, EOS, PAD, SOS, TOKEN, forest_paths, input_codes,
                                           level_position_targets)
from hmerzoo.sequence import teacher_forcing_tensors
from hmerzoo.vocab import Vocabulary
from parity_harness import (check_batched_beam_search, check_single_images_search, check_stepped_logits, load_golden,
                            train_two_steps)

GOLDENS = Path(__file__).resolve().parent / "goldens" / "posformer"
TOL = dict(atol=1e-4, rtol=1e-4)
needs_goldens = pytest.mark.skipif(not (GOLDENS / "state_dict.safetensors").is_file(),
                                   reason=f"PosFormer goldens not found in {GOLDENS}")


@pytest.fixture
def posformer(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return load_golden("posformer", tmp_path_factory)


# ---------------------------------------------------------------------------------------------------------------
# position forest
@pytest.mark.parametrize("latex,expected", [
    ("a + b", [[TOKEN]] * 3),
    ("x ^ { 2 }", [[TOKEN], [TOKEN], [TOKEN], [ABOVE, TOKEN], [TOKEN]]),
    ("x _ { i }", [[TOKEN], [TOKEN], [TOKEN], [BELOW, TOKEN], [TOKEN]]),
    (r"\frac { a } { b ^ { 2 } }",
     [[TOKEN], [TOKEN], [ABOVE, TOKEN], [TOKEN], [TOKEN], [BELOW, TOKEN], [BELOW, TOKEN], [BELOW, TOKEN],
      [BELOW, ABOVE, TOKEN], [BELOW, TOKEN], [TOKEN]]),
    (r"\sqrt [ 3 ] { x }", [[TOKEN], [TOKEN], [ABOVE, TOKEN], [TOKEN], [TOKEN], [BELOW, TOKEN], [TOKEN]]),
    (r"\sqrt { x }", [[TOKEN], [TOKEN], [BELOW, TOKEN], [TOKEN]]),
    ("x ^ { 2", [[TOKEN]] * 4),  # an unclosed group: the structure token is read as a plain one
])
def test_paths_of_hand_worked_captions(latex: str, expected: list[list[int]]) -> None:
    assert forest_paths(latex.split()) == expected


def test_codes_and_targets_of_decoder_rows() -> None:
    row = "<sos> x ^ { 2 } <pad>".split()
    paths = forest_paths(row)
    assert paths == [[SOS], [TOKEN], [TOKEN], [TOKEN], [ABOVE, TOKEN], [TOKEN], [PAD]]
    assert input_codes(paths)[4] == [ABOVE, TOKEN, 0, 0, 0]
    # position t predicts input t + 1 (the <eos> position takes the <pad> input's path; the last the start's)
    assert level_position_targets(paths) == ([0, 0, 0, 1, 0, 0, 0], [TOKEN, TOKEN, TOKEN, ABOVE, TOKEN, PAD, SOS])
    # an R2L row is read in reading order and its paths come back in row order
    r2l = "<eos> } 2 { ^ x".split()
    assert forest_paths(r2l, reverse=True) == [[EOS], [TOKEN], [ABOVE, TOKEN], [TOKEN], [TOKEN], [TOKEN]]
    deep = forest_paths("e ^ { x ^ { y ^ { z ^ { w ^ { v } } } } }".split())
    assert deep[-6] == [ABOVE] * 5 + [TOKEN]  # v: six entries, cut to five in the code
    assert input_codes([deep[-6]]) == [[ABOVE] * 5]
    assert level_position_targets([[SOS], deep[-6]]) == ([4, 0], [ABOVE, SOS])


@needs_goldens
def test_official_codes_and_targets_of_the_recorded_cases() -> None:
    """The official label_make_muti on captions with every rule (recorded by the generator)."""
    dictionary = (GOLDENS / "dictionary.txt").read_text().split()
    words = ["<pad>", "<sos>", "<eos>"] + dictionary
    for case in json.loads((GOLDENS / "meta.json").read_text())["forest_cases"]:
        ids = [words.index(t) for t in case["latex"].split()]
        for i, direction in enumerate(("l2r", "r2l")):
            inputs, _ = teacher_forcing_tensors([ids], direction, 1, 2, 0)
            paths = forest_paths([words[t] for t in inputs[0].tolist()], reverse=direction == "r2l")
            assert input_codes(paths) == case["input_codes"][i], case["latex"]
            assert level_position_targets(paths) == (case["levels"][i], case["positions"][i]), case["latex"]


# ---------------------------------------------------------------------------------------------------------------
# parity with the official outputs
def test_converted_model(posformer: dict) -> None:
    model, meta = posformer["model"], posformer["meta"]
    dictionary = (GOLDENS / "dictionary.txt").read_text().split()
    assert model.vocab.tokens == ["<pad>", "<sos>", "<eos>"] + dictionary
    assert model.num_parameters() == meta["parameter_count"]["parameters"]
    head = model.recipe["model"]["heads"]["position"]
    assert head["type"] == "position_forest" and head["level_weight"] == head["relation_weight"] == 0.25
    assert model.recipe["model"]["decoder"]["coverage_skip"] == ["{", "^", "_"]
    assert model.recipe["decode"]["mode"] == "comer" and model.recipe["optim"]["type"] == "sgd"
    # the official ids of the skipped symbols (arm.py: 110, 82, 83)
    assert model.decoder._skip_ids == [110, 82, 83] == model.heads["position"].decoder._skip_ids


def test_key_mapping(posformer: dict) -> None:
    official = posformer["official"]
    ours = convert_state_dict_posformer(official)
    assert len(ours) == len(official)
    assert ours["heads.position.decoder.code_embed.0.weight"] is official["model.posdecoder.pos_embed.0.weight"]
    assert ours["heads.position.decoder.level_proj.2.bias"] is official["model.posdecoder.layernum_proj.2.bias"]
    assert ours["heads.position.decoder.arm.norm.bn.running_var"] is \
        official["model.posdecoder.model.arm.post_norm.bn.running_var"]
    assert ours["decoder.proj.weight"] is official["model.decoder.proj.weight"]
    assert families_of(official) == ["posformer"]


def test_features_and_all_logits(posformer: dict) -> None:
    model, golden, tokens = posformer["model"], posformer["golden"], posformer["tokens"]
    assert torch.equal(posformer["mask"], golden["enc_mask"])
    torch.testing.assert_close(posformer["memory"], golden["enc_feature"], **TOL)
    head = model.heads["position"]
    with torch.no_grad():
        out = model.decoder(posformer["memory"], posformer["mask"], tokens)
        inputs = head.inputs_of(out, tokens, posformer["memory"].device)
        levels, relations = head.decoder.outputs(posformer["memory"], posformer["mask"], inputs, 2)
    assert torch.equal(inputs, golden["input.tgt"])
    torch.testing.assert_close(out.logits, golden["logits"], **TOL)
    torch.testing.assert_close(levels, golden["level_logits"], **TOL)
    torch.testing.assert_close(relations, golden["pos_logits"], **TOL)


def test_the_skip_changes_the_logits(posformer: dict) -> None:
    """Without the implicit attention correction the same weights give other logits (the golden tells them
    apart), so the parity above checks it."""
    model, golden, tokens = posformer["model"], posformer["golden"], posformer["tokens"]
    skip = model.decoder._skip_ids
    try:
        model.decoder._skip_ids = []
        with torch.no_grad():
            plain = model.decoder(posformer["memory"], posformer["mask"], tokens).logits
    finally:
        model.decoder._skip_ids = skip
    assert (plain - golden["logits"]).abs().max() > 1e-3


def test_targets_and_losses_are_the_official_ones(posformer: dict) -> None:
    model, golden, tokens = posformer["model"], posformer["golden"], posformer["tokens"]
    head = model.heads["position"]
    codes = [input_codes(p) for p in head.decoder.row_paths(golden["input.tgt"])]
    assert torch.equal(torch.tensor(codes, dtype=torch.float32), golden["input.codes"])
    levels, relations = head.targets(golden["input.tgt"])
    assert torch.equal(levels, golden["input.levels"]) and torch.equal(relations, golden["input.positions"])
    with torch.no_grad():
        result = model(Batch(golden["input.img"], golden["input.img_mask"], tokens))
    losses = result["losses"]
    assert set(losses) == {"ce", "level", "relation"}
    torch.testing.assert_close(losses["ce"], golden["loss_ce"] / 1.5, **TOL)
    torch.testing.assert_close(losses["level"], 0.25 * golden["loss_layer"] / 1.5, **TOL)
    torch.testing.assert_close(losses["relation"], 0.25 * golden["loss_pos"] / 1.5, **TOL)
    torch.testing.assert_close(result["loss"], golden["loss_total"], **TOL)


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
def test_incremental_equals_official_logits(posformer: dict, direction: str) -> None:
    check_stepped_logits(posformer, direction)


@pytest.mark.slow  # the official search runs to its end
def test_batched_beam_search_is_the_official(posformer: dict) -> None:
    check_batched_beam_search(posformer, "comer")


@pytest.mark.slow  # the official search runs to its end
def test_single_images_search(posformer: dict) -> None:
    check_single_images_search(posformer)


# ---------------------------------------------------------------------------------------------------------------
OFFICIAL_PARAMETERS = 9_632_236  # LitPosFormer(**config.yaml model), the generator's count


def test_default_recipe_has_the_official_parameter_count(tmp_path: Path) -> None:
    dictionary = tmp_path / "dictionary.txt"
    dictionary.write_text("\n".join(["{", "^", "_"] + [f"t{i}" for i in range(107)]) + "\n")
    vocab = Vocabulary.from_dictionary(str(dictionary), ["<pad>", "<sos>", "<eos>"])
    model = build_model("posformer", vocab=vocab)
    assert model.num_parameters() == OFFICIAL_PARAMETERS
    if (GOLDENS / "meta.json").is_file():
        meta = json.loads((GOLDENS / "meta.json").read_text())
        assert meta["official_default_parameter_count"]["parameters"] == OFFICIAL_PARAMETERS
    assert "posformer" in CONVERTERS


def test_coverage_skip_needs_known_symbols(tmp_path: Path) -> None:
    d = tmp_path / "dictionary.txt"
    d.write_text("x\n")
    vocab = Vocabulary.from_dictionary(str(d), ["<pad>", "<sos>", "<eos>"])
    with pytest.raises(hmerzoo.errors.RecipeError, match="coverage_skip"):
        build_model("posformer", vocab=vocab)


TINY = ["model.encoder.growth_rate=4", "model.encoder.num_layers=2", "model.neck.d_model=32",
        "model.decoder.d_model=32", "model.decoder.nhead=4", "model.decoder.num_layers=2",
        "model.decoder.dim_feedforward=64", "model.decoder.dc=8"]


@pytest.mark.slow
def test_recipe_trains(tmp_path: Path, sample_root: Path) -> None:
    run_dir, steps = train_two_steps("posformer", TINY, sample_root, tmp_path)
    assert all("loss/level" in r and "loss/relation" in r and np.isfinite(r["loss"]) for r in steps)
    model = hmerzoo.load_model(run_dir)
    assert len(model.heads["position"].decoder.layers) == 2  # the position decoder follows the main one
    assert isinstance(model.recognize([torch.rand(1, 32, 48)], beam_size=2, max_len=5)[0].latex, str)


def test_convert_round_trip(posformer: dict, tmp_path: Path) -> None:
    ckpt = tmp_path / "posformer.ckpt"
    torch.save({"state_dict": dict(posformer["official"]), "hyper_parameters": {"dropout": 0.3}}, ckpt)
    (tmp_path / "dictionary.txt").write_bytes((GOLDENS / "dictionary.txt").read_bytes())
    again = hmerzoo.load_model(convert("posformer", ckpt, tmp_path / "model"))
    for k, v in posformer["model"].state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
