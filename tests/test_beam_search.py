"""The batched beam search: official semantics (brute force and a transcription of the official loop on a toy
decoder), beam 1 = greedy, batched = per image, cached = re-run-the-prefix, and parity with the official BTTR
search on the fixture weights (skipped without ../shared).
"""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import hmerzoo
from hmerzoo.builder import build_model
from hmerzoo.config import DecodeConfig
from hmerzoo.decoders.base import SequenceDecoder
from hmerzoo.decoding import (PrefixRecomputingDecoder, beam_search, decode_config, recognize_tensors, search)
from hmerzoo.decoders.base import length_chunks
from hmerzoo.sequence import direction_tokens, teacher_forcing_tensors
from hmerzoo.vocab import Vocabulary

PAD, SOS, EOS = 0, 1, 2
SCORE_TOL = 1e-5


# ---------------------------------------------------------------------------------------------------------------
# a toy decoder: a recurrent state over a tiny vocabulary, so brute force over all sequences is cheap
class ToyDecoder(SequenceDecoder):
    """h_0 = tanh(W_c · masked mean of the memory); h_t = tanh(W_h h_{t-1} + E[token]); logits = sharpness · W_o h_t.

    The same weights serve both directions (only the start token differs), so it accepts mixed directions.
    """

    supports_mixed_directions = True
    memory_padding_invariant = True  # a masked mean ignores padding

    def __init__(self, vocab_size: int = 5, d: int = 8, seed: int = 0, sharpness: float = 3.0,
                 stop_bias: float = 0.0):
        super().__init__()
        torch.manual_seed(seed)
        self.d_model = d
        self.context = nn.Linear(d, d)
        self.recur = nn.Linear(d, d)
        self.embed = nn.Embedding(vocab_size, d)
        self.out = nn.Linear(d, vocab_size)
        self.sharpness = sharpness
        self.stop_bias = stop_bias  # added to both stop tokens' logits (very negative: nothing ever finishes)

    def _h0(self, memory: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        valid = (~mask.bool()).flatten(1).unsqueeze(-1).float()
        pooled = (memory.flatten(1, -2) * valid).sum(1) / valid.sum(1).clamp_min(1)
        return torch.tanh(self.context(pooled))

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.sharpness * self.out(h)
        bias = torch.zeros_like(logits)
        bias[..., SOS] = bias[..., EOS] = self.stop_bias
        return logits + bias

    def init_state(self, memory, memory_mask, direction="l2r"):
        for d in [direction] if isinstance(direction, str) else direction:
            direction_tokens(SOS, EOS, d)
        return self._h0(memory, memory_mask)

    def step(self, state, last_tokens):
        h = torch.tanh(self.recur(state) + self.embed(last_tokens))
        return self._logits(h), h

    def reorder_state(self, state, index):
        return state.index_select(0, index)

    def teacher_forced(self, memory, memory_mask, tokens, direction="l2r"):
        inputs, targets = teacher_forcing_tensors(tokens, direction, SOS, EOS, PAD, memory.device)
        h = self._h0(memory, memory_mask)
        logits = []
        for t in range(inputs.shape[1]):
            step_logits, h = self.step(h, inputs[:, t])
            logits.append(step_logits)
        return torch.stack(logits, 1), targets

    def forward(self, memory, memory_mask, tokens):  # pragma: no cover - not trained here
        raise NotImplementedError


class OneDirectionToy(ToyDecoder):
    """The same decoder, but its state takes one direction only: the search runs one batch per direction."""

    supports_mixed_directions = False

    def init_state(self, memory, memory_mask, direction="l2r"):
        assert isinstance(direction, str), "this decoder takes one direction per state"
        return super().init_state(memory, memory_mask, direction)


def _toy_memory(num_images: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(num_images, 2, 3, 8, generator=g)
    mask = torch.zeros(num_images, 2, 3, dtype=torch.bool)
    mask[1:, :, 2:] = True  # ragged images: padding must not matter
    return memory, mask


def _sequence_score(decoder: ToyDecoder, memory, mask, seq: list[int], direction: str) -> float:
    """log p(seq + stop) for one image, sequence in reading order."""
    return float(decoder.log_likelihood(memory, mask, [seq], direction)[0])


def _official_search(decoder: ToyDecoder, memory, mask, direction: str, beam: int, max_len: int) -> list[tuple]:
    """A direct transcription of the official BTTR ``_beam_search`` for one image (prefix re-run every step):
    [(tokens in reading order, score, finished)] in finishing order."""
    start, stop = direction_tokens(SOS, EOS, direction)
    hyps, scores, done = [[start]], torch.zeros(1), []
    t = 0
    while len(done) < beam and t < max_len:
        bodies = [h[1:] if direction == "l2r" else h[1:][::-1] for h in hyps]
        logits, _ = decoder.teacher_forced(memory.expand(len(hyps), *memory.shape[1:]),
                                           mask.expand(len(hyps), *mask.shape[1:]), bodies, direction)
        log_p = F.log_softmax(logits[:, t], dim=-1)
        vocab = log_p.shape[1]
        top_scores, top_pos = torch.topk((scores[:, None] + log_p).flatten(), k=beam - len(done))
        t += 1
        new_hyps, new_scores = [], []
        for pos, score in zip(top_pos.tolist(), top_scores.tolist()):
            prev, word = divmod(pos, vocab)
            if word == stop:
                seq = hyps[prev][1:]
                done.append((seq if direction == "l2r" else seq[::-1], score, True))
            else:
                new_hyps.append(hyps[prev] + [word])
                new_scores.append(score)
        if len(done) == beam:
            break
        hyps, scores = new_hyps, torch.tensor(new_scores)
    if not done:
        seq = hyps[0][1:]
        done.append((seq if direction == "l2r" else seq[::-1], float(scores[0]), False))
    return done


def _assert_same(found, expected) -> None:
    assert [h.tokens for h in found] == [e[0] for e in expected]
    assert [h.finished for h in found] == [e[2] for e in expected]
    torch.testing.assert_close(torch.tensor([h.score for h in found]), torch.tensor([e[1] for e in expected]),
                               atol=SCORE_TOL, rtol=0)


@pytest.mark.parametrize("direction", ["l2r", "r2l"])
def test_full_width_beam_is_exhaustive_search(direction: str) -> None:
    """A beam wider than every candidate set keeps them all: it finishes every sequence shorter than max_len,
    step by step, each step's in score order, with the summed log-probability of the sequence and its stop."""
    decoder = ToyDecoder().eval()
    memory, mask = _toy_memory(num_images=1)
    max_len, vocab = 4, 5
    stop = direction_tokens(SOS, EOS, direction)[1]
    words = [w for w in range(vocab) if w != stop]
    with torch.no_grad():
        found = beam_search(decoder, memory, mask, [direction], sos_id=SOS, eos_id=EOS, beam_size=10_000,
                            max_len=max_len)[0]
        expected = []
        for length in range(max_len):
            # the search runs in decoding order; R2L hypotheses are returned in reading order
            seqs = [list(s) if direction == "l2r" else list(s)[::-1]
                    for s in itertools.product(words, repeat=length)]
            scored = sorted(((s, _sequence_score(decoder, memory, mask, s, direction)) for s in seqs),
                            key=lambda item: -item[1])
            expected += [(s, score, True) for s, score in scored]
    assert len(found) == sum(len(words) ** n for n in range(max_len))
    _assert_same(found, expected)


@pytest.mark.parametrize("decoder_class", [ToyDecoder, OneDirectionToy])
@pytest.mark.parametrize("beam", [1, 3, 6])
def test_batched_search_equals_the_official_loop(decoder_class, beam: int) -> None:
    """Several images x both directions in one batch, ragged finishing: each beam is the official search's."""
    decoder = decoder_class(vocab_size=7, sharpness=2.0).eval()
    memory, mask = _toy_memory(num_images=3)
    directions = ["l2r", "r2l", "l2r", "r2l", "r2l"]
    images = torch.tensor([0, 0, 1, 1, 2])
    with torch.no_grad():
        found = beam_search(decoder, memory, mask, directions, sos_id=SOS, eos_id=EOS, beam_size=beam, max_len=8,
                            memory_index=images)
        for g, direction in enumerate(directions):
            i = int(images[g])
            _assert_same(found[g], _official_search(decoder, memory[i:i + 1], mask[i:i + 1], direction, beam, 8))


def test_nothing_finishes_returns_the_best_live_hypothesis() -> None:
    decoder = ToyDecoder(vocab_size=6, stop_bias=-1e4).eval()
    memory, mask = _toy_memory(num_images=2)
    with torch.no_grad():
        found = beam_search(decoder, memory, mask, ["l2r", "r2l"], sos_id=SOS, eos_id=EOS, beam_size=4, max_len=5)
        for g, direction in enumerate(["l2r", "r2l"]):
            assert len(found[g]) == 1 and not found[g][0].finished and len(found[g][0].tokens) == 5
            _assert_same(found[g], _official_search(decoder, memory[g:g + 1], mask[g:g + 1], direction, 4, 5))


def test_cached_equals_prefix_recomputing_toy() -> None:
    """The base class's prefix_logits (through teacher_forced) gives the same search as the incremental state."""
    decoder = ToyDecoder(vocab_size=7).eval()
    memory, mask = _toy_memory(num_images=3)
    config = DecodeConfig(beam_size=4, max_len=8, mode="bttr")
    with torch.no_grad():
        cached = search(decoder, memory, mask, config, sos_id=SOS, eos_id=EOS)
        rerun = search(decoder, memory, mask, config, sos_id=SOS, eos_id=EOS,
                       stepper=PrefixRecomputingDecoder(decoder))
    _assert_results_equal(cached, rerun)


def test_bttr_mode_rescoring_and_choice() -> None:
    """bttr mode: L2R hypotheses then R2L ones, each score += the opposite direction's log p, best by score/len."""
    decoder = ToyDecoder(vocab_size=7).eval()
    memory, mask = _toy_memory(num_images=2)
    config = DecodeConfig(beam_size=3, max_len=6, mode="bttr", alpha=0.7)
    with torch.no_grad():
        results = search(decoder, memory, mask, config, sos_id=SOS, eos_id=EOS)
        for i, result in enumerate(results):
            image = (memory[i:i + 1], mask[i:i + 1])
            l2r = _official_search(decoder, *image, "l2r", 3, 6)
            r2l = _official_search(decoder, *image, "r2l", 3, 6)
            assert [h.direction for h in result.hypotheses] == ["l2r"] * len(l2r) + ["r2l"] * len(r2l)
            expected = [(seq, score + _sequence_score(decoder, *image, seq, "r2l"), done) for seq, score, done in l2r]
            expected += [(seq, score + _sequence_score(decoder, *image, seq, "l2r"), done) for seq, score, done in r2l]
            _assert_same(result.hypotheses, expected)
            keys = [score / max(len(seq), 1) ** 0.7 for seq, score, _ in expected]
            best = max(range(len(keys)), key=lambda j: keys[j])
            assert result.best is result.hypotheses[best]
            assert result.best_score == pytest.approx(keys[best], abs=SCORE_TOL)


def test_length_chunks_cover_every_index_once() -> None:
    lengths = [27, 3, 29, 0, 5, 28, 4, 60]
    chunks = length_chunks(lengths)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    for c in chunks:  # padding to the chunk's longest costs at most 25% more than its real positions
        assert len(c) * (max(lengths[i] for i in c) + 1) <= 1.25 * sum(lengths[i] + 1 for i in c) or len(c) == 1


def _assert_results_equal(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert [h.tokens for h in x.hypotheses] == [h.tokens for h in y.hypotheses]
        assert x.best.tokens == y.best.tokens
        torch.testing.assert_close(torch.tensor([h.score for h in x.hypotheses]),
                                   torch.tensor([h.score for h in y.hypotheses]), atol=SCORE_TOL, rtol=0)
        torch.testing.assert_close(torch.tensor([h.search_score for h in x.hypotheses]),
                                   torch.tensor([h.search_score for h in y.hypotheses]), atol=SCORE_TOL, rtol=0)
        assert x.best_score == pytest.approx(y.best_score, abs=SCORE_TOL)


# ---------------------------------------------------------------------------------------------------------------
# a tiny random BTTR model: the real decoder, its KV cache and per-image cross-attention layout
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    d = tmp_path_factory.mktemp("tiny_vocab") / "dictionary.txt"
    d.write_text("\n".join(f"t{i}" for i in range(9)) + "\n")
    recipe = {"name": "tiny_bttr", "optim": {"type": "adadelta", "lr": 1.0},
              "model": {"encoder": {"type": "densenet", "growth_rate": 4, "num_layers": 2},
                        "neck": {"type": "bttr_projection", "d_model": 32},
                        "decoder": {"type": "bttr", "d_model": 32, "nhead": 4, "num_layers": 2,
                                    "dim_feedforward": 64}},
              "decode": {"mode": "bttr", "beam_size": 4, "max_len": 12}}
    torch.manual_seed(3)
    model = build_model(recipe, vocab=Vocabulary.from_dictionary(str(d))).eval()
    with torch.no_grad():
        model.decoder.proj.weight.mul_(8.0)  # peaked outputs: clear margins between candidates
    return model


def _tiny_images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    sizes = [(40, 72), (24, 30), (56, 120), (33, 47)]
    return [(torch.rand(1, h, w, generator=g) > 0.8).float() for h, w in sizes]


def test_beam_one_is_greedy(tiny_model) -> None:
    images = _tiny_images()
    for direction in ("l2r", "r2l"):
        found = tiny_model.recognize(images, beam_size=1, mode=direction, max_len=12)
        for image, rec in zip(images, found):
            mask = torch.zeros(1, *image.shape[1:], dtype=torch.bool)
            assert rec.tokens == tiny_model.greedy(image[None], mask, max_len=12, direction=direction)[0]


def test_batched_equals_per_image(tiny_model) -> None:
    images = _tiny_images()
    config = decode_config(tiny_model.recipe)
    assert config.mode == "bttr" and config.beam_size == 4  # from the recipe's decode section
    with torch.no_grad():
        together = recognize_tensors(tiny_model, images, config)
        in_pairs = recognize_tensors(tiny_model, images, decode_config(tiny_model.recipe, batch_size=2))
        alone = [recognize_tensors(tiny_model, [image], config)[0] for image in images]
    _assert_results_equal(together, alone)
    _assert_results_equal(in_pairs, alone)
    # padded batching (the official CoMER evaluation): one image per batch is the same as per_image
    with torch.no_grad():
        padded_single = recognize_tensors(tiny_model, images, decode_config(tiny_model.recipe, batching="padded",
                                                                            batch_size=1))
        padded = recognize_tensors(tiny_model, images, decode_config(tiny_model.recipe, batching="padded"))
    _assert_results_equal(padded_single, alone)
    assert len(padded) == len(images) and all(r.hypotheses for r in padded)


def test_cached_equals_prefix_recomputing_bttr(tiny_model) -> None:
    images = _tiny_images()
    config = decode_config(tiny_model.recipe)
    with torch.no_grad():
        cached = recognize_tensors(tiny_model, images, config)
        rerun = recognize_tensors(tiny_model, images, config, stepper=PrefixRecomputingDecoder(tiny_model.decoder))
    _assert_results_equal(cached, rerun)


def test_recognize_options_are_checked(tiny_model) -> None:
    image = _tiny_images()[0]
    with pytest.raises(ValueError, match="batching"):
        tiny_model.recognize([image], batching="sideways")
    with pytest.raises(ValueError, match="unknown mode .bttrr.*available: abm, bttr, comer, l2r, r2l"):
        tiny_model.recognize([image], mode="bttrr")
    one = tiny_model.recognize(image)  # a single image is a list of one
    assert len(one) == 1 and one[0].latex == tiny_model.vocab.to_latex(one[0].tokens)


# ---------------------------------------------------------------------------------------------------------------
# parity with the official BTTR beam search on the fixture weights
@pytest.fixture(scope="module")
def bttr_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict:
    # where conftest's parity_dir looks: ../shared beside the repository, or $HMERZOO_SHARED
    shared = Path(os.environ.get("HMERZOO_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
    fixtures = shared / "fixtures" / "parity" / "bttr"
    if not (fixtures / "state_dict.safetensors").is_file():
        pytest.skip(f"BTTR parity fixtures not found at {fixtures} (place ../shared beside the repo or set "
                    "HMERZOO_SHARED)")
    from safetensors.torch import load_file

    from hmerzoo.convert import convert

    model = hmerzoo.load_model(convert("bttr", fixtures / "state_dict.safetensors",
                                       tmp_path_factory.mktemp("bttr_converted")))
    meta = json.loads((fixtures / "meta.json").read_text())
    return {"dir": fixtures, "model": model, "golden": load_file(str(fixtures / "golden.safetensors")),
            "meta": meta, "pngs": [fixtures / s["image_file"] for s in meta["samples"]]}


def _golden_hypotheses(golden: dict, i: int) -> list[list[int]]:
    tokens, lengths = golden[f"beam{i}_hyp_tokens"], golden[f"beam{i}_hyp_lengths"]
    return [tokens[j, :int(lengths[j])].tolist() for j in range(len(lengths))]


@pytest.mark.parametrize("i", [0, 1])
def test_bttr_parity_single_image(bttr_fixture, i: int) -> None:
    model, golden = bttr_fixture["model"], bttr_fixture["golden"]
    image = golden[f"input.img{i}_single"]
    config = decode_config(model.recipe)
    assert (config.mode, config.beam_size, config.max_len, config.alpha) == ("bttr", 10, 200, 1.0)
    with torch.no_grad():
        result = recognize_tensors(model, [image[0]], config)[0]
    hyps = result.hypotheses
    assert [h.tokens for h in hyps] == _golden_hypotheses(golden, i)  # L2R first, each in finishing order
    assert sum(h.direction == "l2r" for h in hyps) == int(golden[f"beam{i}_num_l2r_hyps"])
    torch.testing.assert_close(torch.tensor([h.search_score for h in hyps]),
                               golden[f"beam{i}_hyp_scores_before_cross_rate"], atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.tensor([h.score for h in hyps]), golden[f"beam{i}_hyp_scores"],
                               atol=1e-4, rtol=0)
    assert result.best.tokens == golden[f"beam{i}_best_tokens"].tolist()
    assert result.best_score == pytest.approx(float(golden[f"beam{i}_best_score"]), abs=1e-4)
    # greedy is beam 1 on the real model too
    mask = torch.zeros(1, *image.shape[2:], dtype=torch.bool)
    for direction in ("l2r", "r2l"):
        beam1 = recognize_tensors(model, [image[0]], decode_config(model.recipe, beam_size=1, mode=direction))[0]
        assert beam1.best.tokens == model.greedy(image, mask, direction=direction)[0]


def test_bttr_recognize_files(bttr_fixture) -> None:
    model, meta = bttr_fixture["model"], bttr_fixture["meta"]
    found = model.recognize([str(p) for p in bttr_fixture["pngs"]], beam_size=10)
    for i, rec in enumerate(found):
        official = meta["beam_search_result"][f"image{i}"]
        assert rec.tokens == official["best_tokens"]
        assert rec.latex == official["best_latex"]
        assert rec.score == pytest.approx(official["best_score_len_normalised"], abs=1e-4)
        assert len(rec.hypotheses) == official["num_hypotheses"]
    # the second image decoded with the first (one padded search) and alone give the same hypotheses
    alone = model.recognize([str(bttr_fixture["pngs"][1])], beam_size=10)[0]
    assert [h.tokens for h in alone.hypotheses] == [h.tokens for h in found[1].hypotheses]
    torch.testing.assert_close(torch.tensor([h.score for h in alone.hypotheses]),
                               torch.tensor([h.score for h in found[1].hypotheses]), atol=SCORE_TOL, rtol=0)


def test_cli_predict_json_gives_the_official_best(bttr_fixture, tmp_path, capsys) -> None:
    """The acceptance check through the command line: ``hmerzoo predict MODEL IMAGE --beam 10 --json``."""
    from hmerzoo.cli import main
    from hmerzoo.recipe import dump_recipe

    model, golden = bttr_fixture["model"], bttr_fixture["golden"]
    model_dir = tmp_path / "bttr"
    model_dir.mkdir()
    (model_dir / "recipe.yaml").write_text(dump_recipe(model.recipe))
    model.vocab.save(str(model_dir / "vocab.json"))
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(model_dir / "model.safetensors"))
    for i, png in enumerate(bttr_fixture["pngs"]):
        assert main(["predict", str(model_dir), str(png), "--beam", "10", "--json"]) == 0
        record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert record["image"] == str(png)
        assert record["tokens"] == golden[f"beam{i}_best_tokens"].tolist()
        assert record["score"] == pytest.approx(float(golden[f"beam{i}_best_score"]), abs=1e-3)
        assert record["latex"] == model.vocab.to_latex(record["tokens"])
