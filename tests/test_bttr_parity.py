"""BTTR: the official weights, converted, reproduce the official outputs; incremental decoding equals teacher forcing.

Fixture-dependent tests skip when ../shared/fixtures/parity/bttr is absent (override with $HMERZOO_SHARED).
Logits are compared at every position, ``<pad>`` inputs included: the decoder masks padded inputs exactly like
the official ``tgt_key_padding_mask``, so nothing needs slicing.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import hmerzoo
from hmerzoo.builder import build_model
from hmerzoo.convert import convert, convert_state_dict_bttr, read_official_checkpoint
from hmerzoo.decoders.bttr import BTTRDecoder
from hmerzoo.errors import CheckpointError
from hmerzoo.sequence import IGNORE_INDEX, teacher_forcing_tensors
from hmerzoo.vocab import Vocabulary

SHARED = Path(os.environ.get("HMERZOO_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
FIXTURES = SHARED / "fixtures/parity/bttr"
needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / "state_dict.safetensors").is_file(),
    reason=f"BTTR parity fixtures not found at {FIXTURES} (set HMERZOO_SHARED to the folder holding fixtures/parity)")

TOL = dict(atol=1e-4, rtol=1e-4)
OFFICIAL_PARAMETERS = 6_375_425  # meta.json parameter_count.parameters (buffers not counted)


class NotAWeight:
    """A custom class: pickling it into a checkpoint makes torch.load(weights_only=True) refuse the file."""

    def __init__(self) -> None:
        self.note = "arbitrary object"


# ---------------------------------------------------------------------------------------------------------------
# fixture-dependent: parity with the official outputs
@pytest.fixture(scope="module")
def fixture_data() -> dict:
    from safetensors.torch import load_file

    meta = json.loads((FIXTURES / "meta.json").read_text())
    return {"meta": meta, "golden": load_file(str(FIXTURES / "golden.safetensors")),
            "official": load_file(str(FIXTURES / "state_dict.safetensors")),
            "scores": json.loads((FIXTURES / "single_image_scores.json").read_text()),
            "tokens": [s["token_ids"] for s in meta["samples"]]}


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bttr_converted")
    return convert("bttr", FIXTURES / "state_dict.safetensors", out)


@pytest.fixture(scope="module")
def model(converted_dir: Path) -> hmerzoo.model.HMERModel:
    return hmerzoo.load_model(converted_dir)


@needs_fixtures
def test_converted_directory(converted_dir: Path, model, fixture_data) -> None:
    assert {p.name for p in converted_dir.iterdir()} == {"recipe.yaml", "vocab.json", "model.safetensors"}
    assert not model.training
    # vocabulary: <pad> <sos> <eos> + dictionary order, as the official vocab.json lists it
    official_vocab = json.loads((FIXTURES / "vocab.json").read_text())
    tokens = [official_vocab[str(i)] for i in range(len(official_vocab))] if isinstance(official_vocab, dict) \
        else official_vocab
    assert model.vocab.tokens == tokens
    assert model.vocab.special_ids == {"pad_id": 0, "sos_id": 1, "eos_id": 2}
    assert fixture_data["meta"]["parameter_count"]["parameters"] == OFFICIAL_PARAMETERS
    assert model.num_parameters() == OFFICIAL_PARAMETERS


@needs_fixtures
def test_encoder_features(model, fixture_data) -> None:
    golden = fixture_data["golden"]
    with torch.no_grad():
        memory, mask = model.encode(golden["input.img"], golden["input.img_mask"])
    b, h, w, d = memory.shape
    assert torch.equal(mask.reshape(b, h * w), golden["enc_mask"])
    torch.testing.assert_close(memory.reshape(b, h * w, d), golden["enc_feature"], **TOL)


@needs_fixtures
def test_teacher_forced_logits(model, fixture_data) -> None:
    golden, tokens = fixture_data["golden"], fixture_data["tokens"]
    vocab = model.vocab
    # our inputs/targets, built from the token lists, are the official [L2R; R2L] tgt/out rows
    inputs = torch.cat([teacher_forcing_tensors(tokens, d, vocab.sos_id, vocab.eos_id, vocab.pad_id)[0]
                        for d in ("l2r", "r2l")])
    assert torch.equal(inputs, golden["input.tgt"])
    with torch.no_grad():
        memory, mask = model.encode(golden["input.img"], golden["input.img_mask"])
        out = model.decoder(memory, mask, tokens)
    targets = out.targets.masked_fill(out.targets == IGNORE_INDEX, vocab.pad_id)
    assert torch.equal(targets, golden["input.out"])
    assert out.directions == ["l2r", "l2r", "r2l", "r2l"]
    assert out.hidden.shape == (4, golden["input.tgt"].shape[1], 256)
    # every position, <pad> inputs included
    torch.testing.assert_close(out.logits, golden["logits"], **TOL)
    # one direction at a time gives the same rows
    with torch.no_grad():
        for i, direction in enumerate(("l2r", "r2l")):
            logits, _ = model.decoder.teacher_forced(memory, mask, tokens, direction)
            torch.testing.assert_close(logits, golden["logits"][2 * i:2 * i + 2], **TOL)


@needs_fixtures
def test_score_single_images(model, fixture_data) -> None:
    from PIL import Image

    cases = fixture_data["scores"]["cases"]
    images = [Image.open(FIXTURES / c["image_file"]) for c in cases]
    captions = [c["caption"] for c in cases]
    for direction in ("l2r", "r2l"):
        scores = model.score(images, captions, direction=direction)
        expected = torch.tensor([c[f"{direction}_logprob"] for c in cases], dtype=torch.float32)
        torch.testing.assert_close(scores, expected, atol=1e-3, rtol=0)


def _step_logits(decoder: BTTRDecoder, memory, mask, inputs: torch.Tensor, direction: str,
                 shuffle_at: int | None = None) -> torch.Tensor:
    """Logits of feeding ``inputs`` one column at a time; optionally permute the rows mid-way (beam bookkeeping)."""
    state = decoder.init_state(memory, mask, direction)
    order = torch.arange(inputs.shape[0])
    outputs = []
    for t in range(inputs.shape[1]):
        if t == shuffle_at:
            perm = torch.arange(inputs.shape[0] - 1, -1, -1)
            state = decoder.reorder_state(state, perm)
            order = order[perm]
        logits, state = decoder.step(state, inputs[order, t])
        out = torch.empty_like(logits)
        out[order] = logits
        outputs.append(out)
    return torch.stack(outputs, dim=1)


@needs_fixtures
@pytest.mark.parametrize("direction", ["l2r", "r2l"])
def test_incremental_equals_teacher_forced(model, fixture_data, direction: str) -> None:
    golden, tokens = fixture_data["golden"], fixture_data["tokens"]
    vocab = model.vocab
    with torch.no_grad():
        memory, mask = model.encode(golden["input.img"], golden["input.img_mask"])
        teacher, targets = model.decoder.teacher_forced(memory, mask, tokens, direction)
        inputs, _ = teacher_forcing_tensors(tokens, direction, vocab.sos_id, vocab.eos_id, vocab.pad_id)
        stepped = _step_logits(model.decoder, memory, mask, inputs, direction)
        reordered = _step_logits(model.decoder, memory, mask, inputs, direction, shuffle_at=3)
    torch.testing.assert_close(stepped, teacher, **TOL)
    torch.testing.assert_close(reordered, teacher, **TOL)
    # and against the official logits directly
    offset = 0 if direction == "l2r" else 2
    torch.testing.assert_close(stepped, golden["logits"][offset:offset + 2], **TOL)


@needs_fixtures
def test_greedy_reads_the_fixture_images(model, fixture_data) -> None:
    golden = fixture_data["golden"]
    for i, sample in enumerate(fixture_data["meta"]["samples"]):
        image = golden[f"input.img{i}_single"]
        mask = torch.zeros(image.shape[0], *image.shape[2:], dtype=torch.bool)
        for direction in ("l2r", "r2l"):
            assert model.greedy(image, mask, direction=direction) == [sample["token_ids"]]


# ---------------------------------------------------------------------------------------------------------------
# conversion from other file kinds, and refusals
@needs_fixtures
def test_lightning_ckpt_converts(tmp_path: Path, converted_dir: Path, fixture_data) -> None:
    from safetensors.torch import load_file

    ckpt = tmp_path / "epoch=1.ckpt"
    torch.save({"state_dict": fixture_data["official"], "epoch": 1, "global_step": 10}, ckpt)
    with pytest.raises(CheckpointError, match="--dictionary"):
        convert("bttr", ckpt, tmp_path / "no_dict")  # no dictionary.txt beside it
    out = convert("bttr", ckpt, tmp_path / "out", dictionary=FIXTURES / "dictionary.txt")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(converted_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # dictionary.txt beside the checkpoint is found without the argument; a plain state dict works too
    plain = tmp_path / "plain" / "weights.pt"
    plain.parent.mkdir()
    torch.save(fixture_data["official"], plain)
    shutil.copy(FIXTURES / "dictionary.txt", plain.parent / "dictionary.txt")
    hmerzoo.load_model(convert("bttr", plain, tmp_path / "out2"))


@needs_fixtures
def test_pickled_object_is_refused(tmp_path: Path, fixture_data) -> None:
    ckpt = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": fixture_data["official"], "hyper_parameters": NotAWeight()}, ckpt)
    shutil.copy(FIXTURES / "dictionary.txt", tmp_path / "dictionary.txt")
    with pytest.raises(CheckpointError, match="weights_only") as info:
        convert("bttr", ckpt, tmp_path / "out")
    assert "NotAWeight" in str(info.value)  # says what was refused
    assert "state_dict" in str(info.value)  # and how to proceed
    assert not (tmp_path / "out" / "model.safetensors").exists()


@needs_fixtures
def test_key_mapping(fixture_data) -> None:
    official = fixture_data["official"]
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


@needs_fixtures
def test_wrong_dictionary_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "dictionary.txt"
    short.write_text("\n".join(FIXTURES.joinpath("dictionary.txt").read_text().split()[:-1]) + "\n")
    with pytest.raises(CheckpointError, match="output classes"):
        convert("bttr", FIXTURES / "state_dict.safetensors", tmp_path / "out", dictionary=short)


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
        stepped = _step_logits(decoder, memory, mask, inputs, direction, shuffle_at=2)
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
