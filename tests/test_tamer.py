"""TAMER: the converted official weights (a reduced configuration, tests/goldens/tamer, made by
tools/gen_tamer_goldens.py from the official code) reproduce the official features, logits, structure similarities,
loss terms and the official beam search (CoMER's, plus the structure score, illegal LaTeX dropped); the tree labels
on hand-worked captions and on the official labels of the recorded cases; the full default recipe has the official
parameter count; the recipe trains; the converter round-trips.

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
from hmerzoo.config import DecodeConfig
from hmerzoo.convert import CONVERTERS, convert, convert_state_dict_tamer
from hmerzoo.convert.core import families_of
from hmerzoo.decoding import search
from hmerzoo.errors import RecipeError
from hmerzoo.heads.latex_tree import IllegalLatex, parents, structure_targets
from hmerzoo.heads.tree_structure import TreeStructureHead
from hmerzoo.sequence import IGNORE_INDEX
from hmerzoo.vocab import Vocabulary
from parity_harness import (check_batched_beam_search, check_single_images_search, check_stepped_logits, load_golden,
                            train_two_steps)

GOLDENS = Path(__file__).resolve().parent / "goldens" / "tamer"
TOL = dict(atol=1e-4, rtol=1e-4)
needs_goldens = pytest.mark.skipif(not (GOLDENS / "state_dict.safetensors").is_file(),
                                   reason=f"TAMER goldens not found in {GOLDENS}")


@pytest.fixture
def tamer(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return load_golden("tamer", tmp_path_factory)


# ---------------------------------------------------------------------------------------------------------------
# tree labels
@pytest.mark.parametrize("latex,expected", [
    ("a + b", [-1, 0, 1]),
    ("x ^ { 2 }", [-1, -1, -1, 0, -1]),
    (r"\frac { a } { b } c", [-1, -1, 0, -1, -1, 0, -1, 0]),
    (r"\sqrt [ 3 ] { x }", [-1, -1, 0, -1, -1, 0, -1]),
    ("x _ { i } ^ { 2 } + y", [-1, -1, -1, 0, -1, -1, -1, 0, -1, 0, 9]),
    (r"\sum \limits _ { k } k", [-1, 0, -1, -1, 1, -1, 1]),
    # a subscript after a superscript is not a script: the '_' is an ordinary node, and so on down the chain
    ("x ^ { 2 } _ { 3 }", [-1, -1, -1, 0, -1, 0, 5, 6, 7]),
    (r"\{ a \}", [-1, 0, 1]),  # escaped braces are symbols
    ("", []),
])
def test_parents_of_hand_worked_captions(latex: str, expected: list[int]) -> None:
    assert parents(latex.split()) == expected


@pytest.mark.parametrize("latex", ["x ^", r"\frac { a } b", r"\sqrt", "x _ 2"])
def test_illegal_captions(latex: str) -> None:
    with pytest.raises(IllegalLatex):
        parents(latex.split())
    l2r, r2l, illegal = structure_targets(latex.split())
    n = len(latex.split())
    assert illegal and l2r == [-1] * n + [n - 1] and r2l == [-1] * n + [n - 1]


def test_targets_per_direction() -> None:
    l2r, r2l, illegal = structure_targets("x ^ { 2 } + y".split())
    assert not illegal
    assert l2r == [-1, -1, -1, 0, -1, 0, 5, 6]
    # R2L order: y + } 2 { ^ x; parent p at reading position -> n - 1 - p
    assert r2l == [1, 6, -1, 6, -1, -1, -1, 6]


@needs_goldens
def test_official_labels_of_the_recorded_cases() -> None:
    """The official to_struct_output on captions with every rule and quirk (recorded by the generator)."""
    for case in json.loads((GOLDENS / "meta.json").read_text())["struct_cases"]:
        l2r, r2l, illegal = structure_targets(case["latex"].split())
        assert (l2r, r2l, illegal) == (case["l2r"], case["r2l"], case["illegal"]), case["latex"]


# ---------------------------------------------------------------------------------------------------------------
# parity with the official outputs
def test_converted_model(tamer: dict) -> None:
    model, meta = tamer["model"], tamer["meta"]
    dictionary = (GOLDENS / "dictionary.txt").read_text().split()
    assert model.vocab.tokens == ["<pad>", "<sos>", "<eos>"] + dictionary and len(model.vocab) == 113
    assert model.num_parameters() == meta["parameter_count"]["parameters"]
    head = model.recipe["model"]["heads"]["structure"]
    assert head["type"] == "tree_structure" and head["rescore"] and head["dim_feedforward"] == 1024
    assert model.recipe["decode"]["mode"] == "tamer" and model.recipe["optim"]["type"] == "adadelta"
    assert model.decoder.rescorer is model.heads["structure"]


def test_key_mapping(tamer: dict) -> None:
    official = tamer["official"]
    ours = convert_state_dict_tamer(official)
    assert len(ours) == len(official)
    assert ours["heads.structure.r2l.layer.self_attn.in_proj_weight"] is \
        official["tamer_model.decoder.struct_sim.r2l_struct_sim.trm.layers.0.self_attn.in_proj_weight"]
    assert ours["heads.structure.l2r.to_sim.weight"] is official["tamer_model.decoder.struct_sim.l2r_struct_sim.to_sim.1.weight"]
    assert ours["decoder.proj.weight"] is official["tamer_model.decoder.proj.weight"]
    assert families_of(official) == ["tamer"]


def test_features_logits_and_similarities(tamer: dict) -> None:
    model, golden, tokens = tamer["model"], tamer["golden"], tamer["tokens"]
    assert torch.equal(tamer["mask"], golden["enc_mask"])
    torch.testing.assert_close(tamer["memory"], golden["enc_feature"], **TOL)
    with torch.no_grad():
        out = model.decoder(tamer["memory"], tamer["mask"], tokens)
        sim = model.heads["structure"].similarity(out.hidden, golden["input.tgt"] == 0, out.directions)
    torch.testing.assert_close(out.logits, golden["logits"], **TOL)
    finite = torch.isfinite(golden["sim"])
    assert torch.equal(torch.isfinite(sim), finite)
    torch.testing.assert_close(sim[finite], golden["sim"][finite], **TOL)


def test_targets_and_losses_are_the_official_ones(tamer: dict) -> None:
    model, golden, tokens = tamer["model"], tamer["golden"], tamer["tokens"]
    head: TreeStructureHead = model.heads["structure"]
    targets, illegal = head.targets(tokens, ["l2r", "l2r", "r2l", "r2l"], golden["input.tgt"].shape[1])
    assert torch.equal(targets.masked_fill(targets == IGNORE_INDEX, -1), golden["input.struct_out"])
    assert illegal == [False, False]
    with torch.no_grad():
        losses = model(Batch(golden["input.img"], golden["input.img_mask"], tokens))["losses"]
    assert set(losses) == {"ce", "structure"}
    torch.testing.assert_close(losses["ce"], golden["loss_ce"], **TOL)
    torch.testing.assert_close(losses["structure"], golden["loss_struct"], **TOL)


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
def test_incremental_equals_official_logits(tamer: dict, direction: str) -> None:
    check_stepped_logits(tamer, direction)


@pytest.mark.slow  # ~30-50 s on 2 busy cores: the official search runs to its end
def test_batched_beam_search_is_the_official(tamer: dict) -> None:
    check_batched_beam_search(tamer, "tamer")


@pytest.mark.slow  # ~30-50 s on 2 busy cores: the official search runs to its end
def test_single_images_search(tamer: dict) -> None:
    check_single_images_search(tamer)


def test_tamer_mode_needs_the_head(tamer: dict) -> None:
    model = tamer["model"]
    recipe = json.loads(json.dumps(model.recipe))
    recipe["model"]["heads"] = {}
    plain = build_model(recipe, vocab=model.vocab).eval()
    config = DecodeConfig(mode="tamer", beam_size=2, max_len=3, alpha=1.0)
    with pytest.raises(ValueError, match="tree_structure"):
        search(plain.decoder, tamer["memory"], tamer["mask"], config, sos_id=1, eos_id=2)


# ---------------------------------------------------------------------------------------------------------------
def test_default_recipe_has_the_official_parameter_count(tmp_path: Path) -> None:
    dictionary = tmp_path / "dictionary.txt"
    dictionary.write_text("\n".join(f"t{i}" for i in range(110)) + "\n")
    vocab = Vocabulary.from_dictionary(str(dictionary), ["<pad>", "<sos>", "<eos>"])
    model = build_model("tamer", vocab=vocab)
    assert model.num_parameters() == 8_232_243  # LitTAMER(**config/crohme.yaml model), the generator's count
    if (GOLDENS / "meta.json").is_file():
        meta = json.loads((GOLDENS / "meta.json").read_text())
        assert meta["official_default_parameter_count"]["parameters"] == 8_232_243
    assert "tamer" in CONVERTERS


def test_head_needs_a_transformer_decoder(tmp_path: Path) -> None:
    d = tmp_path / "dictionary.txt"
    d.write_text("x\n")
    vocab = Vocabulary.from_dictionary(str(d))
    with pytest.raises(RecipeError, match="attach_rescorer|transformer decoder"):
        TreeStructureHead(d_model=8, vocab=vocab, decoder=torch.nn.Linear(2, 2), dim_feedforward=16)
    TreeStructureHead(d_model=8, vocab=vocab, rescore=False, dim_feedforward=16)  # the loss alone needs none


TINY = ["model.encoder.growth_rate=4", "model.encoder.num_layers=2", "model.neck.d_model=32",
        "model.decoder.d_model=32", "model.decoder.nhead=4", "model.decoder.num_layers=2",
        "model.decoder.dim_feedforward=64", "model.decoder.dc=8", "model.heads.structure.dim_feedforward=64"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe,overrides,heads", [
    ("tamer", [], {"structure"}),
    # a composition: ICAL's fused prediction and TAMER's structure rescoring on one CoMER
    ("comer_implicit_tree", ["model.heads.implicit.dim_feedforward=64"], {"structure", "implicit", "fusion"}),
])
def test_recipes_train(tmp_path: Path, sample_root: Path, recipe: str, overrides: list[str], heads: set) -> None:
    run_dir, steps = train_two_steps(recipe, TINY + overrides, sample_root, tmp_path)
    assert all(all(f"loss/{h}" in r for h in heads) and np.isfinite(r["loss"]) for r in steps)
    model = hmerzoo.load_model(run_dir)
    assert model.decoder.rescorer is model.heads["structure"] and model.recipe["decode"]["mode"] == "tamer"
    assert isinstance(model.recognize([torch.rand(1, 32, 48)], beam_size=2, max_len=5)[0].latex, str)


def test_convert_round_trip(tamer: dict, tmp_path: Path) -> None:
    ckpt = tmp_path / "tamer.ckpt"
    torch.save({"state_dict": dict(tamer["official"]), "hyper_parameters": {"dropout": 0.3}}, ckpt)
    (tmp_path / "dictionary.txt").write_bytes((GOLDENS / "dictionary.txt").read_bytes())
    again = hmerzoo.load_model(convert("tamer", ckpt, tmp_path / "model"))
    for k, v in tamer["model"].state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
