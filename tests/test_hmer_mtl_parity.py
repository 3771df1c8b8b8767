"""HMER-MTL: converted official weights reproduce the official outputs (CBAM inside the ARM, the skeleton head);
the skeleton targets and losses are the official ones; the mask-aware CBAM option; the recipes train with the
skeleton head added or removed by overrides alone.

Fixture-dependent tests skip when ../shared/fixtures/parity/hmer_mtl is absent (``parity_dir`` in conftest.py); the
checks the four systems share are in parity_harness.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hmerzoo
from hmerzoo.batch import Batch
from hmerzoo.builder import build_model
from hmerzoo.convert import convert_state_dict_comer, convert_state_dict_hmer_mtl
from hmerzoo.decoders.comer import CoMERDecoder
from hmerzoo.errors import CheckpointError, RecipeError
from hmerzoo.heads.structure_skeleton import SKELETON_TOKENS, StructureSkeletonHead
from hmerzoo.sequence import IGNORE_INDEX, DecoderOutput
from hmerzoo.vocab import Vocabulary
from parity_harness import (TOL, check_converted_model, check_greedy, check_incremental, check_single_image_scores,
                            encode, load_fixture, train_two_steps)

OFFICIAL_PARAMETERS = 6_420_024  # meta.json parameter_count.parameters (buffers not counted)
MTL_SPECIALS = "vocab.specials=[<pad>, <sos>, <eos>, <space>]"


@pytest.fixture
def mtl(parity_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return load_fixture(parity_dir / "hmer_mtl", "hmer_mtl", tmp_path_factory)


def batched_output(fixture: dict) -> DecoderOutput:
    memory, mask = encode(fixture)
    with torch.no_grad():
        return fixture["model"].decoder(memory, mask, fixture["tokens"])


# ---------------------------------------------------------------------------------------------------------------
# fixture-dependent: parity with the official outputs
def test_converted_model(mtl: dict) -> None:
    check_converted_model(mtl, OFFICIAL_PARAMETERS, {"pad_id": 0, "sos_id": 1, "eos_id": 2})
    model = mtl["model"]
    assert model.vocab.token_to_id["<space>"] == 3 and len(model.vocab) == 114
    recipe = model.recipe
    decoder = recipe["model"]["decoder"]
    assert decoder["cbam"] and decoder["cbam_ratio"] == 2 and decoder["cbam_kernel"] == 7
    assert not model.decoder.arm.cbam.mask_aware  # faithful by default
    assert recipe["model"]["heads"] == {"skeleton": {"type": "structure_skeleton", "weight": 1.0}}
    assert recipe["loss"] == {"type": "cross_entropy", "weight": 1.0}
    assert recipe["train"]["val_every"] == 4 and "<space>" in recipe["vocab"]["specials"]


def test_key_mapping(mtl: dict) -> None:
    official = mtl["official"]
    ours = convert_state_dict_hmer_mtl(official)
    assert len(ours) == len(official)
    assert ours["heads.skeleton.linear.weight"] is official["comer_model.decoder.proj_imp.weight"]
    assert ours["decoder.proj.weight"] is official["comer_model.decoder.proj.weight"]
    assert ours["decoder.arm.cbam.channel_attention.reduce.weight"] is \
        official["comer_model.decoder.model.arm.cbam.channel_attention.excitation.0.weight"]
    assert ours["decoder.arm.cbam.spatial_attention.bn.running_var"] is \
        official["comer_model.decoder.model.arm.cbam.spatial_attention.bn.running_var"]
    with pytest.raises(CheckpointError, match="not part of an official CoMER"):
        convert_state_dict_comer(official)  # an HMER-MTL checkpoint is not a CoMER one
    without_head = {k: v for k, v in official.items() if "proj_imp" not in k}
    with pytest.raises(CheckpointError, match="proj_imp"):
        convert_state_dict_hmer_mtl(without_head)  # nor the other way round


def test_encoder_features(mtl: dict) -> None:
    golden = mtl["golden"]
    memory, mask = encode(mtl)
    assert torch.equal(mask, golden["enc_mask"])
    torch.testing.assert_close(memory, golden["enc_feature"], **TOL)


def test_teacher_forced_logits_and_skeleton_logits(mtl: dict) -> None:
    golden = mtl["golden"]
    out = batched_output(mtl)
    torch.testing.assert_close(out.logits, golden["logits"], **TOL)
    with torch.no_grad():
        skeleton_logits = mtl["model"].heads["skeleton"].linear(out.hidden)
    torch.testing.assert_close(skeleton_logits, golden["logits_imp"], **TOL)


def test_skeleton_targets_and_losses_are_the_official_ones(mtl: dict) -> None:
    model, golden, tokens = mtl["model"], mtl["golden"], mtl["tokens"]
    head: StructureSkeletonHead = model.heads["skeleton"]
    out = batched_output(mtl)
    targets = head.targets(tokens, out.directions, out.logits.shape[1], torch.device("cpu"))
    # official imp_out: non-skeleton tokens -> <space>, stop tokens kept, <pad> (ignored) after the end
    assert torch.equal(targets.masked_fill(targets == IGNORE_INDEX, 0), golden["input.imp_out"])
    batch = Batch(golden["input.img"], golden["input.img_mask"], tokens)
    with torch.no_grad():
        losses = model(batch)["losses"]

    def official_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # official ce_loss, PAD ignored
        return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=0)

    torch.testing.assert_close(losses["ce"], official_ce(golden["logits"], golden["input.out"]), **TOL)
    torch.testing.assert_close(losses["skeleton"], official_ce(golden["logits_imp"], golden["input.imp_out"]), **TOL)


def test_score_single_images(mtl: dict) -> None:
    check_single_image_scores(mtl)


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
def test_incremental_equals_teacher_forced(mtl: dict, direction: str) -> None:
    offset = 0 if direction == "l2r" else 2
    check_incremental(mtl, direction, reorder_at=4, golden_logits=mtl["golden"]["logits"][offset:offset + 2])


def test_greedy_reads_the_fixture_images(mtl: dict) -> None:
    check_greedy(mtl)


def test_mask_aware_cbam_changes_only_padded_images(mtl: dict) -> None:
    """In the fixture batch image 0 fills the canvas and image 1 is padded: the mask-aware CBAM must give the
    official logits for image 0's rows (0 and 2) and different ones for image 1's rows (1 and 3)."""
    golden = mtl["golden"]
    cbam = mtl["model"].decoder.arm.cbam
    try:
        cbam.mask_aware = True
        out = batched_output(mtl)
    finally:
        cbam.mask_aware = False
    torch.testing.assert_close(out.logits[[0, 2]], golden["logits"][[0, 2]], **TOL)
    assert (out.logits[[1, 3]] - golden["logits"][[1, 3]]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# no fixtures needed
def _refinement(mask_aware: bool) -> torch.nn.Module:
    # CoMER's attention refinement module, its class taken from the decoder (wherever the package keeps it)
    refinement_class = type(CoMERDecoder(in_channels=32, vocab_size=12, pad_id=0, sos_id=1, eos_id=2, d_model=32,
                                         nhead=4, num_layers=1, dim_feedforward=64, dc=8).arm)
    torch.manual_seed(0)
    arm = refinement_class(nhead=4, in_channels=8, dc=8, cbam=True, cbam_mask_aware=mask_aware)
    arm.cbam.spatial_attention.bn.running_mean.fill_(0.3)
    arm.norm.bn.running_var.uniform_(0.5, 2.0)
    return arm.eval()


def test_mask_aware_cbam_ignores_padding_and_faithful_does_not() -> None:
    torch.manual_seed(1)
    coverage = torch.rand(2, 8, 4, 5)
    no_pad = torch.zeros(2, 4, 5, dtype=torch.bool)
    padded = torch.zeros(2, 8, 6, 9)  # the same maps on a larger canvas, zeros outside (as attention is)
    padded[:, :, :4, :5] = coverage
    pad = torch.ones(2, 6, 9, dtype=torch.bool)
    pad[:, :4, :5] = False
    with torch.no_grad():
        faithful, aware = _refinement(False), _refinement(True)
        # without padding the two are the same computation
        torch.testing.assert_close(aware(coverage, no_pad), faithful(coverage, no_pad), atol=1e-6, rtol=1e-6)
        # with padding: mask-aware keeps its result on the valid area, the faithful one does not
        torch.testing.assert_close(aware(padded, pad)[:, :, :4, :5], aware(coverage, no_pad), atol=1e-6, rtol=1e-6)
        assert (faithful(padded, pad)[:, :, :4, :5] - faithful(coverage, no_pad)).abs().max() > 1e-4
        # padded positions stay exactly zero either way
        assert faithful(padded, pad)[pad[:, None].expand(-1, 4, -1, -1)].abs().max() == 0


def _vocab(tmp_path: Path, specials: list[str]) -> Vocabulary:
    d = tmp_path / "dictionary.txt"
    d.write_text("\n".join(["x", "{", "}", "^", "+", "2", r"\frac", "<"]) + "\n")
    return Vocabulary.from_dictionary(str(d), specials)


def test_skeleton_head_targets_per_direction(tmp_path: Path) -> None:
    vocab = _vocab(tmp_path, ["<pad>", "<sos>", "<eos>", "<space>"])
    head = StructureSkeletonHead(d_model=8, vocab=vocab, weight=0.5)
    ids = vocab.encode("x ^ { 2 } + x")
    assert head.skeleton(ids) == vocab.encode("<space> ^ { <space> } + <space>")
    targets = head.targets([ids, vocab.encode("x")], ["l2r", "l2r", "r2l", "r2l"], 9, torch.device("cpu"))
    space, sos, eos = 3, 1, 2
    assert targets[0].tolist() == head.skeleton(ids) + [eos, IGNORE_INDEX]
    assert targets[1].tolist() == [space, eos] + [IGNORE_INDEX] * 7
    assert targets[2].tolist() == head.skeleton(ids)[::-1] + [sos, IGNORE_INDEX]
    assert targets[3].tolist() == [space, sos] + [IGNORE_INDEX] * 7
    assert len(SKELETON_TOKENS) == 17
    # the loss is weight x token-mean cross-entropy against those targets
    hidden = torch.randn(4, 9, 8)
    out = DecoderOutput(logits=torch.zeros(4, 9, len(vocab)), targets=targets, hidden=hidden,
                        directions=["l2r", "l2r", "r2l", "r2l"])
    batch = Batch(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool), [ids, vocab.encode("x")])
    expected = 0.5 * F.cross_entropy(head.linear(hidden).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(head(out, batch), expected)


def test_skeleton_head_needs_space_token(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="vocab.specials"):
        StructureSkeletonHead(d_model=8, vocab=_vocab(tmp_path, ["<pad>", "<sos>", "<eos>"]))
    with pytest.raises(RecipeError, match="vocab.specials"):  # through the builder: comer + head, no <space>
        build_model("comer", ["model.heads.skeleton={type: structure_skeleton}"],
                    vocab=_vocab(tmp_path, ["<pad>", "<sos>", "<eos>"]))


def test_default_recipe_has_the_official_parameter_count(tmp_path: Path) -> None:
    dictionary = tmp_path / "dictionary.txt"
    dictionary.write_text("\n".join(f"t{i}" for i in range(110)) + "\n")
    vocab = Vocabulary.from_dictionary(str(dictionary), ["<pad>", "<sos>", "<eos>", "<space>"])
    model = build_model("hmer_mtl", vocab=vocab)
    assert model.num_parameters() == OFFICIAL_PARAMETERS
    assert list(model.heads) == ["skeleton"] and model.heads["skeleton"].weight == 1.0


TINY = ["model.encoder.growth_rate=4", "model.encoder.num_layers=2", "model.neck.d_model=32",
        "model.decoder.d_model=32", "model.decoder.nhead=4", "model.decoder.num_layers=2",
        "model.decoder.dim_feedforward=64", "model.decoder.dc=8"]


@pytest.mark.parametrize("recipe,overrides,has_head", [
    ("hmer_mtl", [], True),
    ("hmer_mtl", ["model.heads.skeleton=null"], False),
    ("hmer_mtl", ["~model.heads.skeleton"], False),
    ("comer", ["model.heads.skeleton={type: structure_skeleton, weight: 0.5}", MTL_SPECIALS], True),
])
def test_skeleton_head_on_and_off_by_override(tmp_path: Path, sample_root: Path, recipe: str,
                                              overrides: list[str], has_head: bool) -> None:
    run_dir, steps = train_two_steps(recipe, TINY + overrides, sample_root, tmp_path)
    assert all(("loss/skeleton" in r) == has_head for r in steps)
    model = hmerzoo.load_model(run_dir)
    assert ("skeleton" in model.heads) == has_head
