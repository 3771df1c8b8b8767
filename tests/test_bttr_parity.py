"""BTTR: the official weights, converted, reproduce the official outputs; incremental decoding equals teacher forcing.

Fixture-dependent tests skip when ../shared/fixtures/parity/bttr is absent (``parity_dir`` in conftest.py; override
with $HMERZOO_SHARED); the checks the four systems share are in parity_harness.py. Logits are compared at every
position, ``<pad>`` inputs included: the decoder masks padded inputs exactly like the official
``tgt_key_padding_mask``, so nothing needs slicing.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import hmerzoo
from hmerzoo.builder import build_model
from hmerzoo.convert import convert, convert_state_dict_bttr, read_official_checkpoint
from hmerzoo.decoders.bttr import BTTRDecoder
from hmerzoo.errors import CheckpointError
from hmerzoo.sequence import teacher_forcing_tensors
from hmerzoo.vocab import Vocabulary
from parity_harness import (TOL, check_converted_model, check_greedy, check_incremental, check_single_image_scores,
                            check_teacher_forced_logits, encode, load_fixture, step_logits)

OFFICIAL_PARAMETERS = 6_375_425  # meta.json parameter_count.parameters (buffers not counted)


class NotAWeight:
    """A custom class: pickling it into a checkpoint makes torch.load(weights_only=True) refuse the file."""

    def __init__(self) -> None:
        self.note = "arbitrary object"


@pytest.fixture
def bttr(parity_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return load_fixture(parity_dir / "bttr", "bttr", tmp_path_factory)


# ---------------------------------------------------------------------------------------------------------------
# fixture-dependent: parity with the official outputs
def test_converted_directory(bttr: dict) -> None:
    # vocabulary: <pad> <sos> <eos> + dictionary order, as the official vocab.json lists it
    check_converted_model(bttr, OFFICIAL_PARAMETERS, {"pad_id": 0, "sos_id": 1, "eos_id": 2})


def test_encoder_features(bttr: dict) -> None:
    golden = bttr["golden"]
    memory, mask = encode(bttr)
    b, h, w, d = memory.shape  # the official features are flattened to [b, h * w, d]
    assert torch.equal(mask.reshape(b, h * w), golden["enc_mask"])
    torch.testing.assert_close(memory.reshape(b, h * w, d), golden["enc_feature"], **TOL)


def test_teacher_forced_logits(bttr: dict) -> None:
    check_teacher_forced_logits(bttr, hidden_size=256)


def test_score_single_images(bttr: dict) -> None:
    check_single_image_scores(bttr)


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
def test_incremental_equals_teacher_forced(bttr: dict, direction: str) -> None:
    offset = 0 if direction == "l2r" else 2
    check_incremental(bttr, direction, reorder_at=3, golden_logits=bttr["golden"]["logits"][offset:offset + 2])


def test_greedy_reads_the_fixture_images(bttr: dict) -> None:
    check_greedy(bttr)


# ---------------------------------------------------------------------------------------------------------------
# conversion from other file kinds, and refusals
def test_lightning_ckpt_converts(tmp_path: Path, bttr: dict) -> None:
    from safetensors.torch import load_file

    fixtures, converted_dir = bttr["dir"], bttr["converted"]
    ckpt = tmp_path / "epoch=1.ckpt"
    torch.save({"state_dict": bttr["official"], "epoch": 1, "global_step": 10}, ckpt)
    with pytest.raises(CheckpointError, match="--dictionary"):
        convert("bttr", ckpt, tmp_path / "no_dict")  # no dictionary.txt beside it
    out = convert("bttr", ckpt, tmp_path / "out", dictionary=fixtures / "dictionary.txt")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(converted_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # dictionary.txt beside the checkpoint is found without the argument; a plain state dict works too
    plain = tmp_path / "plain" / "weights.pt"
    plain.parent.mkdir()
    torch.save(bttr["official"], plain)
    shutil.copy(fixtures / "dictionary.txt", plain.parent / "dictionary.txt")
    hmerzoo.load_model(convert("bttr", plain, tmp_path / "out2"))


def test_pickled_object_is_refused(tmp_path: Path, bttr: dict) -> None:
    ckpt = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": bttr["official"], "hyper_parameters": NotAWeight()}, ckpt)
    shutil.copy(bttr["dir"] / "dictionary.txt", tmp_path / "dictionary.txt")
    with pytest.raises(CheckpointError, match="weights_only") as info:
        convert("bttr", ckpt, tmp_path / "out")
    assert "NotAWeight" in str(info.value)  # says what was refused
    assert "state_dict" in str(info.value)  # and how to proceed
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_key_mapping(bttr: dict) -> None:
    official = bttr["official"]
    ours = convert_state_dict_bttr(official)
    assert len(ours) == len(official)
    assert ours["neck.feature_proj.weight"] is official["bttr.encoder.feature_proj.0.weight"]
    assert ours["decoder.embed_norm.bias"] is official["bttr.decoder.word_embed.1.bias"]
    assert ours["decoder.layers.2.multihead_attn.in_proj_weight"] is \
        official["bttr.decoder.model.layers.2.multihead_attn.in_proj_weight"]
    # a state dict of the inner BTTR module (no 'bttr.' prefix) maps the same way
    inner = {k[len("bttr."):]: v for k, v in official.items()}
    assert convert_state_dict_bttr(inner).keys() == ours.keys()
    with pytest.raises(CheckpointError, match="not part of an official BTTR"):
        convert_state_dict_bttr({**official, "bttr.extra.weight": torch.zeros(1)})


def test_wrong_dictionary_is_refused(tmp_path: Path, bttr: dict) -> None:
    short = tmp_path / "dictionary.txt"
    short.write_text("\n".join(bttr["dir"].joinpath("dictionary.txt").read_text().split()[:-1]) + "\n")
    with pytest.raises(CheckpointError, match="output classes"):
        convert("bttr", bttr["dir"] / "state_dict.safetensors", tmp_path / "out", dictionary=short)


def test_unknown_converter_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no converter"):
        convert("nope", tmp_path / "x.ckpt", tmp_path / "out")
    with pytest.raises(CheckpointError, match="no such file"):
        read_official_checkpoint(tmp_path / "missing.ckpt")


# ---------------------------------------------------------------------------------------------------------------
# no fixtures needed: the decoder contract on small random models
def _vocab(tmp_path: Path, n: int) -> Vocabulary:
    d = tmp_path / "dictionary.txt"
    d.write_text("\n".join(f"t{i}" for i in range(n)) + "\n")
    return Vocabulary.from_dictionary(str(d))


def _bttr_recipe(**decoder: object) -> dict:
    return {"name": "bttr", "optim": {"type": "adadelta", "lr": 1.0},
            "model": {"encoder": {"type": "densenet"}, "neck": {"type": "bttr_projection", "d_model": 256},
                      "decoder": {"type": "bttr", **decoder}}}


def test_default_bttr_has_the_official_parameter_count(tmp_path: Path) -> None:
    model = build_model(_bttr_recipe(), vocab=_vocab(tmp_path, 110))
    assert len(model.vocab) == 113
    assert model.num_parameters() == OFFICIAL_PARAMETERS


def test_decoder_rejects_mismatched_memory() -> None:
    with pytest.raises(ValueError, match="d_model"):
        BTTRDecoder(in_channels=684, vocab_size=10, pad_id=0, sos_id=1, eos_id=2)
    with pytest.raises(ValueError, match="<pad>"):
        BTTRDecoder(in_channels=256, vocab_size=10, pad_id=None, sos_id=1, eos_id=2)


def _tiny_decoder() -> BTTRDecoder:
    torch.manual_seed(0)
    return BTTRDecoder(in_channels=32, vocab_size=12, pad_id=0, sos_id=1, eos_id=2, d_model=32, nhead=4,
                       num_layers=2, dim_feedforward=64, dropout=0.3)


def _tiny_memory() -> tuple[torch.Tensor, torch.Tensor]:
    memory = torch.randn(3, 2, 5, 32)
    mask = torch.zeros(3, 2, 5, dtype=torch.bool)
    mask[1, :, 3:] = True
    mask[2, 1:, :] = True
    return memory, mask


def test_training_forward_and_backward() -> None:
    decoder = _tiny_decoder().train()
    memory, mask = _tiny_memory()
    memory.requires_grad_(True)
    tokens = [[3, 4, 5], [6], []]
    out = decoder(memory, mask, tokens)
    assert out.logits.shape == (6, 4, 12) and out.hidden.shape == (6, 4, 32)
    assert out.directions == ["l2r"] * 3 + ["r2l"] * 3
    assert out.targets[:3].tolist() == [[3, 4, 5, 2], [6, 2, -100, -100], [2, -100, -100, -100]]
    assert out.targets[3:].tolist() == [[5, 4, 3, 1], [6, 1, -100, -100], [1, -100, -100, -100]]
    loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 12), out.targets.reshape(-1))
    loss.backward()
    assert memory.grad is not None and torch.isfinite(memory.grad).all()
    # padded memory positions get no gradient: they are masked out of cross-attention
    assert memory.grad[1, :, 3:].abs().max() == 0


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
def test_incremental_equals_teacher_forced_random(direction: str) -> None:
    decoder = _tiny_decoder().eval()
    memory, mask = _tiny_memory()
    tokens = [[3, 4, 5, 6, 7], [8, 9], [10]]
    with torch.no_grad():
        teacher, _ = decoder.teacher_forced(memory, mask, tokens, direction)
        inputs, _ = teacher_forcing_tensors(tokens, direction, 1, 2, 0)
        stepped = step_logits(decoder, memory, mask, inputs, direction, reorder_at=2)
    torch.testing.assert_close(stepped, teacher, atol=1e-5, rtol=1e-5)


def test_reorder_state_duplicates_rows() -> None:
    decoder = _tiny_decoder().eval()
    memory, mask = _tiny_memory()
    with torch.no_grad():
        state = decoder.init_state(memory, mask, "l2r")
        logits, state = decoder.step(state, torch.tensor([1, 1, 1]))
        beams = decoder.reorder_state(state, torch.tensor([0, 0, 2]))  # beam search: keep image 0 twice
        next_logits, _ = decoder.step(beams, torch.tensor([3, 4, 5]))
        alone, _ = decoder.step(decoder.reorder_state(state, torch.tensor([0])), torch.tensor([4]))
    torch.testing.assert_close(next_logits[1:2], alone)
    with pytest.raises(ValueError, match="direction"):
        decoder.init_state(memory, mask, "up")
