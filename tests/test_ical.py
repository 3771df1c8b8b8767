"""ICAL: the converted official weights (a reduced configuration, tests/goldens/ical, made by
tools/gen_ical_goldens.py from the official code) reproduce the official features, the explicit, implicit and fused
logits, the official loss terms and the official beam search (which reads the fused logits); the implicit-character
labels on hand-worked captions; the full default recipe has the official parameter count; the recipe trains; heads
compose (CoMER + implicit characters + structure skeleton trains).

The goldens are committed, so nothing here needs ../shared.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import hmerzoo
from hmerzoo.batch import Batch
from hmerzoo.builder import build_model
from hmerzoo.convert import CONVERTERS, convert, convert_state_dict_ical
from hmerzoo.convert.core import families_of
from hmerzoo.errors import CheckpointError, RecipeError
from hmerzoo.heads.implicit_characters import ImplicitCharacterHead, implicit_latex
from hmerzoo.sequence import IGNORE_INDEX, DecoderOutput
from hmerzoo.vocab import Vocabulary
from parity_harness import (check_batched_beam_search, check_single_images_search, check_stepped_logits, load_golden,
                            train_two_steps)

GOLDENS = Path(__file__).resolve().parent / "goldens" / "ical"
TOL = dict(atol=1e-4, rtol=1e-4)
SCORE_TOL = 1e-4
ICAL_SPECIALS = ["<pad>", "<sos>", "<eos>", "<space>"]


@pytest.fixture
def ical(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return load_golden("ical", tmp_path_factory)


# ---------------------------------------------------------------------------------------------------------------
# parity with the official outputs
def test_converted_model(ical: dict) -> None:
    model, meta = ical["model"], ical["meta"]
    assert {p.name for p in ical["converted"].iterdir()} == {"recipe.yaml", "vocab.json", "model.safetensors"}
    dictionary = (GOLDENS / "dictionary.txt").read_text().split()
    assert model.vocab.tokens == ICAL_SPECIALS + dictionary and len(model.vocab) == 114
    assert model.vocab.token_to_id["{"] == 110 and model.vocab.token_to_id["_"] == 113  # TAMER's order, not CoMER's
    assert model.num_parameters() == meta["parameter_count"]["parameters"] == 177_566
    head = model.recipe["model"]["heads"]["implicit"]
    assert head["type"] == "implicit_characters" and head["fuse"] and head["dim_feedforward"] == 1024
    assert model.recipe["decode"]["mode"] == "comer" and model.recipe["data"]["scale_aug"] is False


def test_key_mapping(ical: dict) -> None:
    official = ical["official"]
    ours = convert_state_dict_ical(official)
    assert len(ours) == len(official)
    assert ours["decoder.proj.weight"] is official["ical_model.decoder.exp_proj.weight"]
    assert ours["heads.implicit.sccm.self_attn.in_proj_weight"] is \
        official["ical_model.decoder.SCCM.te.layers.0.self_attn.in_proj_weight"]
    assert ours["heads.implicit.gate.weight"] is official["ical_model.decoder.fusion.w_att.weight"]
    assert ours["heads.implicit.implicit_proj.bias"] is official["ical_model.decoder.imp_proj.1.bias"]
    assert ours["heads.implicit.fusion_proj.weight"] is official["ical_model.decoder.fusion_proj.1.weight"]
    assert families_of(official) == ["ical"]


def test_encoder_features(ical: dict) -> None:
    assert torch.equal(ical["mask"], ical["golden"]["enc_mask"])
    torch.testing.assert_close(ical["memory"], ical["golden"]["enc_feature"], **TOL)


def test_explicit_implicit_and_fused_logits(ical: dict) -> None:
    model, golden, tokens = ical["model"], ical["golden"], ical["tokens"]
    vocab = model.vocab
    with torch.no_grad():
        out = model.decoder(ical["memory"], ical["mask"], tokens)  # the training pass: explicit logits
        torch.testing.assert_close(out.logits, golden["logits_exp"], **TOL)
        pad = golden["input.tgt"] == vocab.pad_id
        torch.testing.assert_close(model.heads["implicit"].implicit_logits(out.hidden, pad), golden["logits_imp"],
                                   **TOL)
        for i, direction in enumerate(("l2r", "r2l")):  # inference reads the fused logits
            fused, _ = model.decoder.teacher_forced(ical["memory"], ical["mask"], tokens, direction)
            torch.testing.assert_close(fused, golden["logits_fusion"][2 * i:2 * i + 2], **TOL)


def test_targets_and_losses_are_the_official_ones(ical: dict) -> None:
    model, golden, tokens = ical["model"], ical["golden"], ical["tokens"]
    head: ImplicitCharacterHead = model.heads["implicit"]
    targets = head.targets(tokens, ["l2r", "l2r", "r2l", "r2l"], golden["input.tgt"].shape[1], torch.device("cpu"))
    assert torch.equal(targets.masked_fill(targets == IGNORE_INDEX, 0), golden["input.imp_out"])
    with torch.no_grad():
        losses = model(Batch(golden["input.img"], golden["input.img_mask"], tokens))["losses"]
    assert set(losses) == {"ce", "implicit", "fusion"}
    torch.testing.assert_close(losses["ce"], golden["loss_exp"], **TOL)
    torch.testing.assert_close(losses["implicit"], golden["loss_implicit"], **TOL)  # dynamic class weights
    torch.testing.assert_close(losses["fusion"], golden["loss_fusion"], **TOL)


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
def test_incremental_equals_official_fused_logits(ical: dict, direction: str) -> None:
    check_stepped_logits(ical, direction, "logits_fusion", reorder_ats=(None, 4))


def test_batched_beam_search_is_the_official(ical: dict) -> None:
    # every first-pass hypothesis (L2R heaps, then R2L heaps in decoding order), its score and its rating
    results, ordered = check_batched_beam_search(ical, "comer")
    # (the short calibration reads image 1's label; image 0's comes out with one token wrong, as the official does)
    assert results[1].best.tokens == ical["tokens"][1]
    raw, half = ical["golden"]["beam_rescore_raw"], len(ordered) // 2
    torch.testing.assert_close(torch.tensor([h.score - h.search_score for h in ordered]),
                               torch.cat((raw[half:], raw[:half])), atol=SCORE_TOL, rtol=0)


def test_single_images_search_and_score(ical: dict) -> None:
    model, meta = ical["model"], ical["meta"]
    check_single_images_search(ical, mode="comer")
    for case in meta["single_image_scores"]:
        for direction in ("l2r", "r2l"):
            score = model.score([Image.open(GOLDENS / case["image_file"])], [case["caption"]], direction=direction)
            assert abs(float(score[0]) - case[f"{direction}_logprob"]) < 1e-3


def test_removing_the_head_gives_the_explicit_prediction(ical: dict, tmp_path: Path) -> None:
    """The same weights without the head: a CoMER whose prediction is the explicit logits."""
    model = ical["model"]
    recipe = json.loads(json.dumps(model.recipe))
    recipe["model"]["heads"] = {}
    plain = build_model(recipe, vocab=model.vocab)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("heads.")})
    plain.eval()
    with torch.no_grad():
        logits, _ = plain.decoder.teacher_forced(ical["memory"], ical["mask"], ical["tokens"], "l2r")
    torch.testing.assert_close(logits, ical["golden"]["logits_exp"][:2], **TOL)


# ---------------------------------------------------------------------------------------------------------------
# no goldens needed
@pytest.mark.parametrize("latex,labels", [
    ("x ^ { 2 }", "<space> ^ { <space> }"),
    (r"\frac { a } { b }", "<space> { <space> } { <space> }"),
    (r"\sum _ { i = 1 } ^ { n } x _ { i }",
     "<space> _ { <space> <space> <space> } ^ { <space> } <space> _ { <space> }"),
    (r"\sqrt [ 3 ] { x }", "<space> <space> <space> <space> { <space> }"),
    (r"\{ a \}", "<space> <space> <space>"),  # escaped braces are visible characters
    ("a + b", "<space> <space> <space>"),
])
def test_implicit_labels_of_hand_worked_captions(latex: str, labels: str) -> None:
    assert implicit_latex(latex) == labels


def _vocab(tmp_path: Path, specials: list[str] = ICAL_SPECIALS) -> Vocabulary:
    d = tmp_path / "dictionary.txt"
    d.write_text("\n".join(["x", "2", "a", "+", "{", "}", "^", "_"]) + "\n")
    return Vocabulary.from_dictionary(str(d), specials)


def test_targets_per_direction_and_dynamic_weights(tmp_path: Path) -> None:
    vocab = _vocab(tmp_path)
    head = ImplicitCharacterHead(d_model=8, vocab=vocab, fuse=False, dim_feedforward=16)
    ids = [vocab.encode("x ^ { 2 }"), vocab.encode("a")]
    targets = head.targets(ids, ["l2r", "l2r", "r2l", "r2l"], 6, torch.device("cpu"))
    sp, sos, eos, ig = 3, 1, 2, IGNORE_INDEX
    caret, lb, rb = (vocab.token_to_id[t] for t in "^{}")
    assert targets.tolist() == [[sp, caret, lb, sp, rb, eos], [sp, eos, ig, ig, ig, ig],
                                [rb, sp, lb, caret, sp, sos], [sp, sos, ig, ig, ig, ig]]
    # 6 <space> of 24 positions (padding counts, as the official frequency): f = 0.25
    weights = head.class_weights(targets)
    expected = 1 + np.log1p(1 / (0.75 + 1e-6))
    assert weights[sp] == 1.0 and abs(float(weights[0]) - expected) < 1e-5 and abs(float(weights[-1]) - expected) < 1e-5
    # the loss is the class-weighted mean: sum w_y * CE / sum w_y
    torch.manual_seed(0)
    hidden = torch.randn(4, 6, 8)
    out = DecoderOutput(logits=torch.zeros(4, 6, len(vocab)), targets=targets, hidden=hidden,
                        directions=["l2r", "l2r", "r2l", "r2l"])
    batch = Batch(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool), ids)
    head.eval()
    loss = head(out, batch)["implicit"]
    logits = head.implicit_logits(hidden, targets == IGNORE_INDEX).reshape(-1, len(vocab))
    flat = targets.reshape(-1)
    valid = flat != IGNORE_INDEX
    per = F.cross_entropy(logits[valid], flat[valid], reduction="none")
    w = weights[flat[valid]]
    torch.testing.assert_close(loss, (w * per).sum() / w.sum())


def test_head_needs_space_token_and_a_transformer_decoder(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="vocab.specials"):
        ImplicitCharacterHead(d_model=8, vocab=_vocab(tmp_path, ["<pad>", "<sos>", "<eos>"]), fuse=False)
    with pytest.raises(RecipeError, match="attach_output"):
        ImplicitCharacterHead(d_model=8, vocab=_vocab(tmp_path), decoder=torch.nn.Linear(2, 2))


def test_default_recipe_has_the_official_parameter_count(tmp_path: Path) -> None:
    meta = json.loads((GOLDENS / "meta.json").read_text())
    dictionary = tmp_path / "dictionary.txt"
    dictionary.write_text("\n".join(f"t{i}" for i in range(110)) + "\n")
    vocab = Vocabulary.from_dictionary(str(dictionary), ICAL_SPECIALS)
    model = build_model("ical", vocab=vocab)
    assert model.num_parameters() == meta["official_default_parameter_count"]["parameters"] == 7_369_238
    assert "ical" in CONVERTERS


TINY = ["model.encoder.growth_rate=4", "model.encoder.num_layers=2", "model.neck.d_model=32",
        "model.decoder.d_model=32", "model.decoder.nhead=4", "model.decoder.num_layers=2",
        "model.decoder.dim_feedforward=64", "model.decoder.dc=8"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe,overrides,heads", [
    ("ical", ["model.heads.implicit.dim_feedforward=64"], {"implicit", "fusion"}),
    ("comer_implicit_skeleton", ["model.heads.implicit.dim_feedforward=64"], {"implicit", "fusion", "skeleton"}),
])
def test_recipes_train(tmp_path: Path, sample_root: Path, recipe: str, overrides: list[str], heads: set) -> None:
    run_dir, steps = train_two_steps(recipe, TINY + overrides, sample_root, tmp_path)
    assert all(all(f"loss/{h}" in r for h in heads) and np.isfinite(r["loss"]) for r in steps)
    model = hmerzoo.load_model(run_dir)
    assert model.decoder.__dict__.get("_output") is model.heads["implicit"]  # predicts with the fused logits
    image = torch.rand(1, 32, 48)
    assert isinstance(model.recognize([image], beam_size=2, max_len=5)[0].latex, str)


def test_convert_round_trip_and_wrong_family(ical: dict, tmp_path: Path) -> None:
    """A Lightning-style .ckpt (weights_only, hyper-parameters included) converts to the same model; a CoMER
    checkpoint is refused by the ICAL converter with the right name."""
    ckpt = tmp_path / "ical.ckpt"
    torch.save({"state_dict": dict(ical["official"]), "hyper_parameters": {"dropout": 0.3, "dynamic_weight": True}},
               ckpt)
    (tmp_path / "dictionary.txt").write_bytes((GOLDENS / "dictionary.txt").read_bytes())
    out = convert("ical", ckpt, tmp_path / "model")
    again = hmerzoo.load_model(out)
    for k, v in ical["model"].state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    comer_like = {k.replace("ical_model.", "comer_model."): v for k, v in ical["official"].items()
                  if "SCCM" not in k and "fusion" not in k and "imp_proj" not in k}
    bad = tmp_path / "comer.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in comer_like.items()}, str(bad))
    with pytest.raises(CheckpointError, match="not a ICAL|use `hmerzoo convert comer`|belong to no model"):
        convert("ical", bad, tmp_path / "bad", dictionary=GOLDENS / "dictionary.txt")
