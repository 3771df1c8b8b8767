"""The ``comer`` decoding mode: the official CoMER / HMER-MTL search (HF-style scorer over the doubled L2R + R2L
batch, opposite-direction rating, best of 2 x beam) reproduced on the converted fixture weights - padded batch,
first pass and rating included, and single images through ``model.recognize`` - plus fixture-free checks on a toy
decoder. Fixture-dependent tests skip when ../shared/fixtures/parity is absent.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hmerzoo.config import DecodeConfig
from hmerzoo.decoding import PrefixRecomputingDecoder, search
from hmerzoo.decoding import FinishedHeap, HFFinishing, beam_search, rate_by_opposite_direction
from test_beam_search import EOS, PAD, SOS, ToyDecoder, _toy_memory
from test_comer_parity import load_fixture

SCORE_TOL = 1e-4
_BATCHED: dict[str, dict] = {}


# HMER-MTL's search runs ~110 steps batched and its faithful CBAM makes every image a search of its own: ~1 min
@pytest.fixture(params=["comer", pytest.param("hmer_mtl", marks=pytest.mark.slow)])
def fixture(request, parity_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return load_fixture(parity_dir / request.param, request.param, tmp_path_factory)


def batched_run(fixture: dict) -> dict:
    """The padded-batch search on ``input.img``: first pass, rating and final choice (cached per fixture)."""
    key = str(fixture["dir"])
    if key not in _BATCHED:
        model, golden = fixture["model"], fixture["golden"]
        vocab = model.vocab
        config = DecodeConfig(mode="comer", beam_size=10, max_len=200, alpha=1.0)
        with torch.no_grad():
            memory, mask = model.encode(golden["input.img"], golden["input.img_mask"])
            results = search(model.decoder, memory, mask, config, sos_id=vocab.sos_id, eos_id=vocab.eos_id)
        _BATCHED[key] = {"results": results, "memory": memory, "mask": mask}
    return _BATCHED[key]


def golden_rows(golden: dict, prefix: str) -> list[list[int]]:
    lengths = golden[f"{prefix}_lengths"].tolist()
    return [golden[f"{prefix}_tokens"][i, :n].tolist() for i, n in enumerate(lengths)]


def test_batched_search_reproduces_the_official(fixture: dict) -> None:
    golden = fixture["golden"]
    results = batched_run(fixture)["results"]
    assert [r.best.tokens for r in results] == golden_rows(golden, "beam")
    assert [r.best.tokens for r in results] == [s["tokens"] for s in fixture["meta"]["beam_search_result"]["batched"]]
    torch.testing.assert_close(torch.tensor([r.best_score for r in results]), golden["beam_scores"],
                               atol=SCORE_TOL, rtol=0)


def test_batched_first_pass_and_rating(fixture: dict) -> None:
    """Every first-pass hypothesis in the official order (L2R heaps of all images, then R2L heaps; R2L in decoding
    order), its length-normalised score, and the opposite-direction rating."""
    golden = fixture["golden"]
    results = batched_run(fixture)["results"]
    n = len(results)
    beam = len(results[0].hypotheses) // 2
    ordered = [h for r in results for h in r.hypotheses[:beam]] + [h for r in results for h in r.hypotheses[beam:]]
    decoding_order = [h.tokens[::-1] if h.direction == "r2l" else h.tokens for h in ordered]
    assert decoding_order == golden_rows(golden, "beam_pass1")
    torch.testing.assert_close(torch.tensor([h.search_score for h in ordered]), golden["beam_pass1_scores"],
                               atol=SCORE_TOL, rtol=0)
    half = n * beam
    raw = golden["beam_rescore_raw"]
    official_rating = torch.cat((raw[half:], raw[:half]))  # the official swaps the halves back
    ours = torch.tensor([h.score - h.search_score for h in ordered])
    torch.testing.assert_close(ours, official_rating, atol=SCORE_TOL, rtol=0)
    assert all(h.finished for h in ordered)


def test_rating_function_matches_the_official(fixture: dict) -> None:
    golden, model = fixture["golden"], fixture["model"]
    run = batched_run(fixture)
    rows = golden_rows(golden, "beam_pass1")
    n, half = run["memory"].shape[0], len(rows) // 2
    beam = half // n
    reading = rows[:half] + [r[::-1] for r in rows[half:]]
    index = torch.tensor([(i // beam) % n for i in range(len(rows))])
    # the official rates the R2L-found half first (in L2R), then the L2R-found half (in R2L)
    order = list(range(half, len(rows))) + list(range(half))
    rated = rate_by_opposite_direction(
        model.decoder, run["memory"][index[order]], run["mask"][index[order]], [reading[i] for i in order],
        ["l2r"] * half + ["r2l"] * half, sos_id=model.vocab.sos_id, eos_id=model.vocab.eos_id,
        pad_id=model.vocab.pad_id, alpha=1.0)
    torch.testing.assert_close(rated, golden["beam_rescore_raw"], atol=SCORE_TOL, rtol=0)


def test_recognize_single_images_with_recipe_defaults(fixture: dict) -> None:
    """``model.recognize([png0, png1])`` with the recipe's decode section (comer, per_image) = the official
    search on each image alone."""
    from PIL import Image

    model, golden, meta = fixture["model"], fixture["golden"], fixture["meta"]
    assert model.recipe["decode"]["mode"] == "comer"
    images = [Image.open(fixture["dir"] / s["image_file"]) for s in meta["samples"]]
    found = model.recognize(images)
    for i, rec in enumerate(found):
        assert rec.tokens == golden[f"beam_single{i}_tokens"].tolist()
        assert rec.tokens == meta["beam_search_result"]["single"][i]["tokens"]
        assert abs(rec.score - float(golden[f"beam_single{i}_score"])) < SCORE_TOL
        assert len(rec.hypotheses) == 20


# ---------------------------------------------------------------------------------------------------------------
# no fixtures needed
def test_finished_heap_keeps_the_best_in_insertion_order() -> None:
    heap = FinishedHeap(size=2, alpha=1.0)
    heap.add([3], -2.0, 2)  # -1.0
    heap.add([4], -1.0, 2)  # -0.5
    assert heap.worst_score == -1.0 and heap.is_done(-10.0, 1)
    heap.add([5], -3.0, 1)  # -3.0: worse than the worst, rejected
    assert [t for _, t, _ in heap.beams] == [[3], [4]]
    heap.add([6], -0.6, 3)  # -0.2: evicts [3], keeps the insertion order of the rest
    assert [t for _, t, _ in heap.beams] == [[4], [6]] and heap.worst_score == -0.5
    assert heap.is_done(-2.0, 2) and not heap.is_done(-0.5, 2)  # -0.5 >= -1.0; -0.5 < -0.25
    assert not FinishedHeap(size=2, alpha=1.0).is_done(0.0, 1)


def toy() -> ToyDecoder:
    decoder = ToyDecoder(vocab_size=7, sharpness=2.0).eval()
    decoder.pad_id = PAD
    return decoder


@pytest.mark.parametrize("beam", [1, 3])
def test_toy_batched_equals_alone_and_prefix_rerun(beam: int) -> None:
    """Images in one doubled batch decode as each alone, and the cached steps equal re-running the prefix."""
    decoder = toy()
    memory, mask = _toy_memory()
    config = DecodeConfig(mode="comer", beam_size=beam, max_len=12, alpha=1.0)
    with torch.no_grad():
        together = search(decoder, memory, mask, config, sos_id=SOS, eos_id=EOS)
        rerun = search(decoder, memory, mask, config, sos_id=SOS, eos_id=EOS,
                       stepper=PrefixRecomputingDecoder(decoder))
        for i, result in enumerate(together):
            alone = search(decoder, memory[i:i + 1], mask[i:i + 1], config, sos_id=SOS, eos_id=EOS)[0]
            for a, b in ((result, alone), (result, rerun[i])):
                assert a.best.tokens == b.best.tokens
                assert [h.tokens for h in a.hypotheses] == [h.tokens for h in b.hypotheses]
                torch.testing.assert_close(torch.tensor([h.score for h in a.hypotheses]),
                                           torch.tensor([h.score for h in b.hypotheses]), atol=1e-5, rtol=0)
            assert len(result.hypotheses) == 2 * beam
            assert [h.direction for h in result.hypotheses] == ["l2r"] * beam + ["r2l"] * beam
            assert result.best_score == max(h.score for h in result.hypotheses)


def test_toy_scores_are_the_official_formulas() -> None:
    """First pass: sum log p / (len + 1); final: + opposite-direction sum log p / (len + 1), both counting the
    start token (the stop token's probability is in the sums)."""
    decoder = toy()
    memory, mask = _toy_memory(num_images=1)
    config = DecodeConfig(mode="comer", beam_size=3, max_len=12, alpha=1.0)
    with torch.no_grad():
        result = search(decoder, memory, mask, config, sos_id=SOS, eos_id=EOS)[0]
        checked = 0
        for h in result.hypotheses:
            if not h.finished or PAD in h.tokens:  # <pad> inputs and targets are masked in the rating
                continue
            checked += 1
            length = len(h.tokens) + 1
            own = float(decoder.log_likelihood(memory, mask, [h.tokens], h.direction)[0])
            other = float(decoder.log_likelihood(memory, mask, [h.tokens],
                                                 "r2l" if h.direction == "l2r" else "l2r")[0])
            assert abs(h.search_score - own / length) < 1e-5
            assert abs(h.score - (own + other) / length) < 1e-5
    assert checked > 0


def test_toy_max_len_returns_live_rows() -> None:
    """A beam that never finishes returns its live rows after ``max_len - 1`` tokens, as ``finalize``."""
    decoder = ToyDecoder(vocab_size=7, stop_bias=-1e4).eval()
    decoder.pad_id = PAD
    memory, mask = _toy_memory(num_images=2)
    config = DecodeConfig(mode="comer", beam_size=2, max_len=5, alpha=1.0)
    with torch.no_grad():
        results = search(decoder, memory, mask, config, sos_id=SOS, eos_id=EOS)
    for r in results:
        assert len(r.hypotheses) == 4 and not any(h.finished for h in r.hypotheses)
        assert all(len(h.tokens) == 4 for h in r.hypotheses)


def test_one_direction_decoder_gets_one_batch_per_direction() -> None:
    """Beams never interact, so a decoder that cannot mix directions in one state (one search per direction)
    finds what the mixed batch finds."""
    from functools import partial

    from test_beam_search import OneDirectionToy

    memory, mask = _toy_memory(num_images=2)
    rule = partial(HFFinishing, alpha=1.0)
    found = {}
    for decoder in (toy(), OneDirectionToy(vocab_size=7, sharpness=2.0).eval()):
        with torch.no_grad():
            found[type(decoder).__name__] = beam_search(
                decoder, memory.repeat(2, 1, 1, 1), mask.repeat(2, 1, 1), ["l2r", "l2r", "r2l", "r2l"], sos_id=SOS,
                eos_id=EOS, beam_size=2, max_len=6, rule=rule)
    mixed, split = found.values()
    assert [[h.tokens for h in g] for g in mixed] == [[h.tokens for h in g] for g in split]
    assert [h.score for g in mixed for h in g] == pytest.approx([h.score for g in split for h in g], abs=1e-6)
    assert all(len(g) == 2 for g in mixed)
