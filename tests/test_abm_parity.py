"""ABM: the official weights, converted, reproduce the official outputs, losses and beam search.

Fixture-dependent tests skip when ../shared/fixtures/parity/abm is absent (``parity_dir`` in conftest.py; override
with $HMERZOO_SHARED); the checks the four systems share are in parity_harness.py. ABM's own conventions hold
throughout: its vocabulary (sos = 0, eos = 1, no padding token), float masks with 1 = valid in the golden inputs
(hmerzoo's masks are True = padding), time-major golden targets.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hmerzoo
from hmerzoo.batch import Batch
from hmerzoo.builder import build_model
from hmerzoo.config import DecodeConfig
from hmerzoo.convert import convert, convert_state_dict_abm
from hmerzoo.errors import CheckpointError
from hmerzoo.sequence import IGNORE_INDEX
from parity_harness import TOL, check_converted_model, check_incremental, check_single_image_scores, encode, load_fixture

ATTENTION_TOL = dict(atol=1e-5, rtol=1e-5)  # meta.json's suggestion for the attention maps
OFFICIAL_PARAMETERS = 8_428_988  # meta.json parameter_count.parameters (buffers not counted)
BEAM = DecodeConfig(mode="abm", beam_size=10, max_len=1000, alpha=1.0)  # test.sh -k 10, test.py maxlen=1000
END_TOKEN = {"l2r": 1, "r2l": 0}  # eos ends an L2R sample, sos an R2L one


def abm_batch(golden: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return golden["input.x"], golden["input.x_mask"] < 0.5  # official 1 = valid -> True = padding


@pytest.fixture
def abm(parity_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return load_fixture(parity_dir / "abm", "abm", tmp_path_factory, batch=abm_batch)


def test_converted_directory(abm: dict) -> None:
    check_converted_model(abm, OFFICIAL_PARAMETERS, {"pad_id": None, "sos_id": 0, "eos_id": 1})
    recipe = abm["model"].recipe
    assert recipe["model"]["decoder"]["directions"] == ["l2r", "r2l"]
    assert recipe["model"]["decoder"]["coverage_kernels"] == [11, 5]
    assert recipe["model"]["encoder"]["stem_norm"] is False and recipe["model"]["encoder"]["post_norm"] is False
    assert recipe["decode"]["mode"] == "abm"


def test_encoder_features(abm: dict) -> None:
    golden = abm["golden"]
    memory, mask = encode(abm)
    assert torch.equal(~mask, golden["enc_mask"].bool())
    torch.testing.assert_close(memory, golden["enc_feature"], **TOL)


def test_teacher_forced_logits_and_attention(abm: dict) -> None:
    model, golden, tokens = abm["model"], abm["golden"], abm["tokens"]
    memory, mask = encode(abm)
    with torch.no_grad():
        out = model.decoder(memory, mask, tokens)
    assert out.directions == ["l2r", "l2r", "r2l", "r2l"]
    # our targets are the official y_out / y_reverse_out (time-major) where y_mask is 1
    for rows, prefix in ((slice(0, 2), "y"), (slice(2, 4), "y_reverse")):
        valid = golden[f"input.{prefix}_mask"].T.bool()
        assert torch.equal(out.targets[rows] != IGNORE_INDEX, valid)
        assert torch.equal(out.targets[rows][valid], golden[f"input.{prefix}_out"].T[valid])
    # every position, padded steps included (inputs padded with the direction's start token, as the official)
    torch.testing.assert_close(out.logits[:2], golden["logits_l2r"], **TOL)
    torch.testing.assert_close(out.logits[2:], golden["logits_r2l"], **TOL)
    torch.testing.assert_close(out.extras["attention"][:2], golden["alphas_l2r"], **ATTENTION_TOL)
    torch.testing.assert_close(out.extras["attention"][2:], golden["alphas_r2l"], **ATTENTION_TOL)
    assert out.hidden.shape == (4, 28, 256)
    with torch.no_grad():
        for direction, key in (("l2r", "y_in"), ("r2l", "y_reverse_in")):
            inputs, _ = model.decoder._teacher_forcing(tokens, direction, memory.device)
            assert torch.equal(inputs, golden[f"input.{key}"].T)
            logits, _ = model.decoder.teacher_forced(memory, mask, tokens, direction)
            torch.testing.assert_close(logits, golden[f"logits_{direction}"], **TOL)


def test_initial_state_of_single_images(abm: dict) -> None:
    model, golden = abm["model"], abm["golden"]
    for i in range(2):
        image = golden[f"input.img{i}_single"]
        with torch.no_grad():
            memory, mask = model.encode(image, torch.zeros(1, *image.shape[2:], dtype=torch.bool))
            for direction in ("l2r", "r2l"):
                state = model.decoder.init_state(memory, mask, direction)
                torch.testing.assert_close(state.hidden, golden[f"img{i}_init_state_{direction}"], **TOL)


def test_score_single_images(abm: dict) -> None:
    check_single_image_scores(abm)


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
def test_incremental_equals_teacher_forced(abm: dict, direction: str) -> None:
    # ABM pads its inputs with the direction's start token; past its end a row's teacher-forced state is frozen,
    # which stepping does not know, so only the target positions are compared
    inputs, _ = abm["model"].decoder._teacher_forcing(abm["tokens"], direction, torch.device("cpu"))
    check_incremental(abm, direction, reorder_at=3, inputs=inputs, valid_only=True)


def _official_samples(golden: dict, image: int, direction: str) -> tuple[list[list[int]], torch.Tensor]:
    prefix = f"beam{image}_{direction}_"
    samples = [s[:n].tolist() for s, n in zip(golden[prefix + "samples"], golden[prefix + "sample_lengths"])]
    return samples, golden[prefix + "costs"]


def _as_official(hypothesis, direction: str) -> list[int]:
    """Our hypothesis (reading order, no start/stop token) as the official sample (decoding order + end token)."""
    tokens = hypothesis.tokens if direction == "l2r" else hypothesis.tokens[::-1]
    return tokens + [END_TOKEN[direction]]


@pytest.mark.parametrize("image", [0, 1])
def test_beam_search_reproduces_the_official_l2r_search(abm: dict, image: int) -> None:
    """decode.mode abm through model.recognize: every finished sample in finishing order, its cost, the choice.
    The fixture weights are not a trained model: image 0 decodes to its label twice over and image 1 to image 0's
    label, exactly as the official code does with them."""
    model, golden = abm["model"], abm["golden"]
    samples, costs = _official_samples(golden, image, "l2r")
    result = model.recognize(golden[f"input.img{image}_single"][0], beam_size=10, max_len=1000, mode="abm")[0]
    assert [_as_official(h, "l2r") for h in result.hypotheses] == samples
    assert all(h.finished for h in result.hypotheses)
    torch.testing.assert_close(torch.tensor([-h.score for h in result.hypotheses]), costs, atol=1e-4, rtol=0)
    best = golden[f"beam{image}_l2r_best_tokens"].tolist()
    assert result.tokens == best[:-1]
    assert result.latex == model.vocab.to_latex(best)
    assert -result.score == pytest.approx(float(golden[f"beam{image}_l2r_best_cost"]), abs=1e-4)


@pytest.mark.parametrize("image", [0, 1])
def test_beam_search_reproduces_the_official_r2l_search(abm: dict, image: int) -> None:
    # the model API has no ABM search from right to left (decode.mode abm is L2R, as the official test.py)
    from hmerzoo.decoding.modes import abm_direction

    model, golden = abm["model"], abm["golden"]
    samples, costs = _official_samples(golden, image, "r2l")
    picture = golden[f"input.img{image}_single"]
    with torch.no_grad():
        memory, mask = model.encode(picture, torch.zeros(1, *picture.shape[2:], dtype=torch.bool))
        result = abm_direction("r2l")(model.decoder, memory, mask, BEAM, sos_id=0, eos_id=1)[0]
    assert [_as_official(h, "r2l") for h in result.hypotheses] == samples
    torch.testing.assert_close(torch.tensor([-h.score for h in result.hypotheses]), costs, atol=1e-4, rtol=0)
    assert _as_official(result.best, "r2l") == golden[f"beam{image}_r2l_best_tokens"].tolist()
    assert -result.best_score == pytest.approx(float(golden[f"beam{image}_r2l_best_cost"]), abs=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# the training objective, against the official train.py formulas applied to the golden logits
def _official_losses(golden: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE_L2R + CE_R2L, T^2 KL) as train.py computes them (time-major tensors, its exact operations)."""
    scores, scores2 = golden["logits_l2r"].permute(1, 0, 2), golden["logits_r2l"].permute(1, 0, 2)
    y_mask, yr_mask = golden["input.y_mask"], golden["input.y_reverse_mask"]
    ce = 0.0
    for s, out, m in ((scores, golden["input.y_out"], y_mask), (scores2, golden["input.y_reverse_out"], yr_mask)):
        loss = F.cross_entropy(s.reshape(-1, s.shape[2]), out.reshape(-1), reduction="none").view(out.shape)
        ce = ce + ((loss * m).sum(0) / m.sum(0)).mean()
    new_scores = scores[1:].contiguous().view(-1, scores.shape[2])
    new_scores = new_scores.index_select(0, torch.nonzero(y_mask[1:].reshape(-1)).view(-1))
    new_scores2 = torch.flip(scores2[1:], [0]).contiguous().view(-1, scores2.shape[2])
    new_scores2 = new_scores2.index_select(0, torch.nonzero(torch.flip(yr_mask[1:], [0]).reshape(-1)).view(-1))
    t = 4
    kl = torch.nn.KLDivLoss(reduction="batchmean")(F.log_softmax(new_scores2 / t, dim=-1),
                                                   F.softmax(new_scores / t, dim=-1)) * t * t
    return ce, kl


def _fixture_batch(golden: dict, tokens: list[list[int]]) -> Batch:
    return Batch(images=golden["input.x"], image_mask=golden["input.x_mask"] < 0.5, tokens=tokens)


def test_losses_match_train_py(abm: dict) -> None:
    golden, tokens = abm["golden"], abm["tokens"]
    model = hmerzoo.load_model(abm["converted"])
    with torch.no_grad():
        out = model(_fixture_batch(golden, tokens))
    ce, kl = _official_losses(golden)
    assert set(out["losses"]) == {"ce", "distill"}
    torch.testing.assert_close(out["losses"]["ce"], ce, **TOL)
    torch.testing.assert_close(out["losses"]["distill"], 0.5 * kl, **TOL)
    torch.testing.assert_close(out["loss"], ce + 0.5 * kl, **TOL)


@pytest.mark.parametrize("override", ["model.heads.distill=null", "model.heads.distill.weight=0"])
def test_distillation_off_changes_only_the_loss(abm: dict, override: str) -> None:
    from safetensors.torch import load_file

    golden, tokens, converted_dir = abm["golden"], abm["tokens"], abm["converted"]
    state = load_file(str(converted_dir / "model.safetensors"))
    with_kd = hmerzoo.load_model(converted_dir)
    without_kd = build_model(converted_dir / "recipe.yaml", [override], vocab=with_kd.vocab)
    without_kd.load_state_dict(state)
    without_kd.eval()
    assert without_kd.num_parameters() == with_kd.num_parameters()
    batch = _fixture_batch(golden, tokens)
    with torch.no_grad():
        a, b = with_kd(batch), without_kd(batch)
    assert torch.equal(a["output"].logits, b["output"].logits)
    assert torch.equal(a["losses"]["ce"], b["losses"]["ce"])
    assert float(a["losses"]["distill"]) > 0
    assert float(b["losses"].get("distill", 0.0)) == 0.0
    torch.testing.assert_close(a["loss"] - b["loss"], a["losses"]["distill"])


# ---------------------------------------------------------------------------------------------------------------
# conversion from the official file kind, and refusals
def test_official_pkl_converts(tmp_path: Path, abm: dict) -> None:
    """train.py writes torch.save(model.state_dict()) to a .pkl: read with weights_only=True (no code runs)."""
    from safetensors.torch import load_file

    pkl = tmp_path / "ABM_params162_lr0.03125_56.75.pkl"
    torch.save(abm["official"], pkl)
    shutil.copy(abm["dir"] / "dictionary.txt", tmp_path / "dictionary.txt")
    out = convert("abm", pkl, tmp_path / "out")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(abm["converted"] / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_key_mapping(abm: dict) -> None:
    official = abm["official"]
    ours = convert_state_dict_abm(official)
    # every official tensor is used once; each GRU's three gate layers became one
    assert len(ours) == len(official) - 2 * 6 * 2  # per branch: 6 packed tensors from 18
    assert ours["encoder.dense2.3.conv1.weight"] is official["encoder1.dense2.3.conv1.weight"]
    assert ours["decoder.r2l.attention.coverage_convs.1.weight"] is official["gru_model2.conv_Q2.weight"]
    packed = ours["decoder.l2r.gru2_hidden.bias"]
    assert torch.equal(packed, torch.cat([official[f"gru_model.fc_Uh{g}2.bias"] for g in "zrh"]))
    with pytest.raises(CheckpointError, match="not part of an official ABM"):
        convert_state_dict_abm({**official, "gru_model.extra.weight": torch.zeros(1)})
    # an L2R-only checkpoint (train.sh -L2R) converts to a one-branch decoder
    l2r_only = {k: v for k, v in official.items() if not k.split(".")[0].endswith("2")}
    assert all(k.startswith(("encoder.", "decoder.l2r.")) for k in convert_state_dict_abm(l2r_only))


def test_wrong_dictionary_is_refused(tmp_path: Path, abm: dict) -> None:
    plain = tmp_path / "dictionary.txt"  # a BTTR-style dictionary: no 'sos'/'eos' entries
    plain.write_text("\n".join(line.split()[0] for line in
                               abm["dir"].joinpath("dictionary.txt").read_text().splitlines()[2:]) + "\n")
    with pytest.raises(CheckpointError, match="not an ABM dictionary"):
        convert("abm", abm["dir"] / "state_dict.safetensors", tmp_path / "out", dictionary=plain)
