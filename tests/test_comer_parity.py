"""CoMER: converted official weights reproduce the official outputs; incremental decoding (running coverage sums)
equals teacher forcing; the decoder's switches and the shipped recipe.

Fixture-dependent tests skip when ../shared/fixtures/parity/comer is absent (``parity_dir`` in conftest.py); the
checks the four systems share are in parity_harness.py. Logits are compared at every position, ``<pad>`` inputs
included, as the official forward computes them.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hmerzoo.builder import build_model
from hmerzoo.convert import convert_state_dict_comer
from hmerzoo.decoders.comer import CoMERDecoder
from hmerzoo.errors import CheckpointError
from hmerzoo.sequence import teacher_forcing_tensors
from hmerzoo.vocab import Vocabulary
from parity_harness import (TOL, check_converted_model, check_greedy, check_incremental, check_single_image_scores,
                            check_teacher_forced_logits, encode, load_fixture, step_logits)

__all__ = ["load_fixture"]  # test_comer_search.py takes the fixture loader from here
OFFICIAL_PARAMETERS = 6_389_041  # meta.json parameter_count.parameters (buffers not counted)


@pytest.fixture
def comer(parity_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return load_fixture(parity_dir / "comer", "comer", tmp_path_factory)


# ---------------------------------------------------------------------------------------------------------------
# fixture-dependent: parity with the official outputs
def test_converted_model(comer: dict) -> None:
    check_converted_model(comer, OFFICIAL_PARAMETERS, {"pad_id": 0, "sos_id": 1, "eos_id": 2})
    model = comer["model"]
    decoder = model.recipe["model"]["decoder"]
    assert decoder["type"] == "comer" and decoder["cross_coverage"] and decoder["self_coverage"]
    assert decoder["dc"] == 32 and not decoder.get("cbam", False)
    assert model.recipe["optim"]["type"] == "sgd" and not model.heads


def test_key_mapping(comer: dict) -> None:
    official = comer["official"]
    ours = convert_state_dict_comer(official)
    assert len(ours) == len(official)
    assert ours["decoder.input_norm.weight"] is official["comer_model.decoder.norm.weight"]
    assert ours["decoder.arm.norm.bn.running_var"] is official["comer_model.decoder.model.arm.post_norm.bn.running_var"]
    assert ours["neck.feature_proj.weight"] is official["comer_model.encoder.feature_proj.weight"]
    inner = {k[len("comer_model."):]: v for k, v in official.items()}  # the inner CoMER module's state dict
    assert convert_state_dict_comer(inner).keys() == ours.keys()
    with pytest.raises(CheckpointError, match="not part of an official CoMER"):
        convert_state_dict_comer({**official, "comer_model.decoder.proj_imp.weight": torch.zeros(1)})


def test_encoder_features(comer: dict) -> None:
    golden = comer["golden"]
    memory, mask = encode(comer)
    assert torch.equal(mask, golden["enc_mask"])
    torch.testing.assert_close(memory, golden["enc_feature"], **TOL)


def test_teacher_forced_logits(comer: dict) -> None:
    check_teacher_forced_logits(comer, hidden_size=256)


def test_score_single_images(comer: dict) -> None:
    check_single_image_scores(comer)


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
def test_incremental_equals_teacher_forced(comer: dict, direction: str) -> None:
    offset = 0 if direction == "l2r" else 2
    check_incremental(comer, direction, reorder_at=4, golden_logits=comer["golden"]["logits"][offset:offset + 2])


def test_greedy_reads_the_fixture_images(comer: dict) -> None:
    check_greedy(comer)


# ---------------------------------------------------------------------------------------------------------------
# no fixtures needed: the decoder on small random models
def tiny_decoder(**kwargs) -> CoMERDecoder:
    torch.manual_seed(0)
    options = dict(d_model=32, nhead=4, num_layers=3, dim_feedforward=64, dropout=0.3, dc=8)
    options.update(kwargs)
    decoder = CoMERDecoder(in_channels=32, vocab_size=12, pad_id=0, sos_id=1, eos_id=2, **options)
    # non-trivial BatchNorm statistics, so that a per-position or padding mistake shows in eval mode
    for module in decoder.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return decoder


def tiny_memory() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    memory = torch.randn(3, 3, 5, 32)
    mask = torch.zeros(3, 3, 5, dtype=torch.bool)
    mask[1, :, 3:] = True
    mask[2, 2:, :] = True
    return memory, mask


COVERAGE_VARIANTS = {
    "fusion": dict(),
    "cross_only": dict(self_coverage=False),
    "self_only": dict(cross_coverage=False),
    "no_arm": dict(cross_coverage=False, self_coverage=False),
    "cbam": dict(cbam=True),
    "cbam_mask_aware": dict(cbam=True, cbam_mask_aware=True),
}


@pytest.mark.parametrize("variant", list(COVERAGE_VARIANTS))
@pytest.mark.parametrize("direction", ["l2r", "r2l"])
def test_incremental_equals_teacher_forced_random(variant: str, direction: str) -> None:
    decoder = tiny_decoder(**COVERAGE_VARIANTS[variant]).eval()
    memory, mask = tiny_memory()
    tokens = [[3, 4, 5, 6, 7, 8, 9], [8, 9], [10, 11, 3]]
    with torch.no_grad():
        teacher, _ = decoder.teacher_forced(memory, mask, tokens, direction)
        inputs, _ = teacher_forcing_tensors(tokens, direction, 1, 2, 0)
        stepped = step_logits(decoder, memory, mask, inputs, direction, reorder_at=3)
    torch.testing.assert_close(stepped, teacher, atol=1e-5, rtol=1e-5)


def test_mixed_directions_share_a_batch() -> None:
    """L2R and R2L rows in one state (the official search's doubled batch) give each direction's own logits."""
    decoder = tiny_decoder(cbam=True).eval()
    memory, mask = tiny_memory()
    tokens = [[3, 4, 5], [6, 7, 8]]
    l2r, _ = teacher_forcing_tensors(tokens, "l2r", 1, 2, 0)
    r2l, _ = teacher_forcing_tensors(tokens, "r2l", 1, 2, 0)
    with torch.no_grad():
        both = step_logits_mixed(decoder, memory[:2].repeat(2, 1, 1, 1), mask[:2].repeat(2, 1, 1),
                                 torch.cat((l2r, r2l)), ["l2r", "l2r", "r2l", "r2l"])
        torch.testing.assert_close(both[:2], decoder.teacher_forced(memory[:2], mask[:2], tokens, "l2r")[0])
        torch.testing.assert_close(both[2:], decoder.teacher_forced(memory[:2], mask[:2], tokens, "r2l")[0])
    assert decoder.supports_mixed_directions
    with pytest.raises(ValueError, match="directions"):
        decoder.init_state(memory, mask, ["l2r", "r2l"])  # one per memory row


def step_logits_mixed(decoder, memory, mask, inputs, directions):
    state = decoder.init_state(memory, mask, directions)
    state = decoder.reorder_state(state, torch.arange(inputs.shape[0]))
    assert state.direction == directions
    outputs = []
    for t in range(inputs.shape[1]):
        logits, state = decoder.step(state, inputs[:, t])
        outputs.append(logits)
    return torch.stack(outputs, dim=1)


@pytest.mark.parametrize("variant,invariant", [("fusion", True), ("cbam", False), ("cbam_mask_aware", True)])
def test_memory_padding_invariance(variant: str, invariant: bool) -> None:
    """A memory padded beyond the image (anything in the padded area, mask True) decodes like the image alone,
    unless the faithful CBAM pools over the padding; ``memory_padding_invariant`` says which."""
    decoder = tiny_decoder(**COVERAGE_VARIANTS[variant]).eval()
    assert decoder.memory_padding_invariant == invariant
    # strong refinement and CBAM gates (as after training), so that a dependence on padding shows
    decoder.arm.norm.bn.weight.data.fill_(5.0)
    if decoder.arm.cbam is not None:
        decoder.arm.cbam.spatial_attention.bn.weight.data.fill_(5.0)
        decoder.arm.cbam.channel_attention.expand.weight.data.mul_(5.0)
    torch.manual_seed(2)
    memory = torch.randn(1, 3, 4, 32)
    padded = torch.randn(1, 5, 7, 32) * 3  # garbage where the mask says padding
    padded[:, :3, :4] = memory
    pad = torch.ones(1, 5, 7, dtype=torch.bool)
    pad[:, :3, :4] = False
    inputs, _ = teacher_forcing_tensors([[3, 4, 5, 6, 7]], "l2r", 1, 2, 0)
    with torch.no_grad():
        alone = step_logits(decoder, memory, torch.zeros(1, 3, 4, dtype=torch.bool), inputs, "l2r")
        shared = step_logits(decoder, padded, pad, inputs, "l2r")
    difference = (shared - alone).abs().max()
    assert difference < 5e-6 if invariant else difference > 1e-4


def test_coverage_switches_shape_the_refinement() -> None:
    assert tiny_decoder().arm.conv.in_channels == 8  # cross + self coverage: 2 x nhead maps
    assert tiny_decoder(self_coverage=False).arm.conv.in_channels == 4
    assert tiny_decoder(cross_coverage=False, self_coverage=False).arm is None
    assert tiny_decoder(cbam=True).arm.cbam is not None and tiny_decoder().arm.cbam is None
    with pytest.raises(ValueError, match="cbam"):
        tiny_decoder(cbam=True, cross_coverage=False, self_coverage=False)
    # the refinement changes the output: CoMER is not BTTR with another embedding
    memory, mask = tiny_memory()
    with torch.no_grad():
        a, _ = tiny_decoder().eval().teacher_forced(memory, mask, [[3, 4], [5], [6]])
        b, _ = tiny_decoder(cross_coverage=False, self_coverage=False).eval().teacher_forced(memory, mask,
                                                                                             [[3, 4], [5], [6]])
    assert not torch.allclose(a, b)


def test_training_forward_and_backward() -> None:
    decoder = tiny_decoder(cbam=True).train()
    memory, mask = tiny_memory()
    memory.requires_grad_(True)
    tokens = [[3, 4, 5], [6], []]
    out = decoder(memory, mask, tokens)
    assert out.logits.shape == (6, 4, 12) and out.hidden.shape == (6, 4, 32)
    assert out.directions == ["l2r"] * 3 + ["r2l"] * 3
    assert out.targets[3:].tolist() == [[5, 4, 3, 1], [6, 1, -100, -100], [1, -100, -100, -100]]
    loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 12), out.targets.reshape(-1))
    loss.backward()
    assert torch.isfinite(memory.grad).all()
    assert memory.grad[1, :, 3:].abs().max() == 0  # padded memory is masked out of attention and refinement
    for name, p in decoder.arm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_decoder_rejects_mismatched_memory() -> None:
    with pytest.raises(ValueError, match="d_model"):
        CoMERDecoder(in_channels=684, vocab_size=10, pad_id=0, sos_id=1, eos_id=2)
    with pytest.raises(ValueError, match="<pad>"):
        CoMERDecoder(in_channels=256, vocab_size=10, pad_id=None, sos_id=1, eos_id=2)


def test_default_recipe_has_the_official_parameter_count(tmp_path: Path) -> None:
    dictionary = tmp_path / "dictionary.txt"
    dictionary.write_text("\n".join(f"t{i}" for i in range(110)) + "\n")
    model = build_model("comer", vocab=Vocabulary.from_dictionary(str(dictionary)))
    assert model.num_parameters() == OFFICIAL_PARAMETERS
    recipe = model.recipe
    assert recipe["optim"] == {"type": "sgd", "lr": 0.08, "momentum": 0.9, "weight_decay": 1.0e-4}
    assert recipe["sched"]["factor"] == 0.25 and recipe["train"]["val_every"] == 2
    assert recipe["data"]["scale_to_limit"] and recipe["data"]["scale_aug"]
    assert recipe["decode"] == {"mode": "comer", "beam_size": 10, "max_len": 200, "alpha": 1.0}
