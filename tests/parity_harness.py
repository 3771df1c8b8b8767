"""What the four parity tests (``test_{bttr,comer,hmer_mtl,abm}_parity.py``) share.

Each system's fixtures are a folder ``<shared>/fixtures/parity/<system>/`` (``parity_dir`` in conftest.py: ../shared
beside the repository, or $HMERZOO_SHARED; tests skip with the reason when it is absent) holding the official
weights with their official keys (``state_dict.safetensors``), the official outputs on a two-image batch
(``golden.safetensors``), ``meta.json`` (the samples' token ids, the parameter count), ``vocab.json``,
``dictionary.txt`` and the per-image log-probabilities of ``single_image_scores.json``.

:func:`load_fixture` converts the weights once per session with ``hmerzoo.convert`` and loads the result with
``hmerzoo.load_model``; the checks below run through the public model API only (``model.encode``,
``model.decoder(...)`` / ``teacher_forced``, ``init_state`` / ``step`` / ``reorder_state``, ``model.score``,
``model.greedy``), so they hold whatever the decoders look like inside.

The tests of the goldens generated in this repository (``test_{ical,tamer,posformer}.py``, :func:`load_golden`)
share the checks at the end: step-by-step logits, the batched beam search with its first pass, each image's search
alone; :func:`train_two_steps` is the two-step training run that the recipe tests make.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

import hmerzoo
from hmerzoo.convert import convert
from hmerzoo.sequence import IGNORE_INDEX, teacher_forcing_tensors

TOL = dict(atol=1e-4, rtol=1e-4)  # features and logits against the official ones
SCORE_TOL = dict(atol=1e-3, rtol=0)  # a whole caption's log-probability (a sum over its tokens)
DIRECTIONS = ("l2r", "r2l")

_LOADED: dict[Path, dict] = {}


def default_batch(golden: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixture batch as hmerzoo takes it: images and their padding mask (True = padding)."""
    return golden["input.img"], golden["input.img_mask"]


def load_fixture(directory: Path, name: str, tmp_path_factory: pytest.TempPathFactory,
                 batch: Callable[[dict], tuple[torch.Tensor, torch.Tensor]] = default_batch) -> dict:
    """Fixture files + the converted model (converted once per session, cached by directory).

    Keys: dir, converted (the model directory), model, meta, golden, official (the official state dict),
    scores, tokens (the samples' token ids), images and image_mask (the batch, by ``batch(golden)``).
    """
    from safetensors.torch import load_file

    if not (directory / "state_dict.safetensors").is_file():
        pytest.skip(f"{name} parity fixtures not found in {directory}")
    if directory not in _LOADED:
        meta = json.loads((directory / "meta.json").read_text())
        out = convert(name, directory / "state_dict.safetensors", tmp_path_factory.mktemp(f"{name}_converted"))
        golden = load_file(str(directory / "golden.safetensors"))
        images, image_mask = batch(golden)
        _LOADED[directory] = {
            "dir": directory, "converted": out, "model": hmerzoo.load_model(out), "meta": meta, "golden": golden,
            "official": load_file(str(directory / "state_dict.safetensors")),
            "scores": (json.loads((directory / "single_image_scores.json").read_text())
                       if (directory / "single_image_scores.json").is_file() else None),
            "tokens": [s["token_ids"] for s in meta["samples"]], "images": images, "image_mask": image_mask}
    return _LOADED[directory]


GOLDENS = Path(__file__).resolve().parent / "goldens"


def load_golden(name: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """:func:`load_fixture` for the goldens generated in this repository (``tests/goldens/<name>``, from the
    official code by ``tools/gen_<name>_goldens.py``), plus the encoded fixture batch (``memory``, ``mask``)."""
    fixture = load_fixture(GOLDENS / name, name, tmp_path_factory)
    if "memory" not in fixture:
        with torch.no_grad():
            fixture["memory"], fixture["mask"] = fixture["model"].encode(fixture["images"], fixture["image_mask"])
    return fixture


def encode(fixture: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The converted model's memory and memory mask of the fixture batch."""
    with torch.no_grad():
        return fixture["model"].encode(fixture["images"], fixture["image_mask"])


def official_tokens(directory: Path) -> list[str]:
    """The official vocabulary in id order (vocab.json: {"id": token} or a list)."""
    vocab = json.loads((directory / "vocab.json").read_text())
    return [vocab[str(i)] for i in range(len(vocab))] if isinstance(vocab, dict) else vocab


# ---------------------------------------------------------------------------------------------------------------
# checks every system makes
def check_converted_model(fixture: dict, parameters: int, special_ids: dict) -> None:
    """The model directory's files, eval mode, the official vocabulary and the official parameter count."""
    model = fixture["model"]
    assert {p.name for p in fixture["converted"].iterdir()} == {"recipe.yaml", "vocab.json", "model.safetensors"}
    assert not model.training
    assert model.vocab.tokens == official_tokens(fixture["dir"])
    assert model.vocab.special_ids == special_ids
    assert fixture["meta"]["parameter_count"]["parameters"] == parameters  # buffers not counted
    assert model.num_parameters() == parameters


def check_teacher_forced_logits(fixture: dict, hidden_size: int) -> None:
    """Transformer decoders (BTTR, CoMER): the official [L2R; R2L] input/target rows and logits at every position,
    ``<pad>`` inputs included, for the bidirectional batch and for one direction at a time."""
    model, golden, tokens = fixture["model"], fixture["golden"], fixture["tokens"]
    vocab = model.vocab
    inputs = torch.cat([teacher_forcing_tensors(tokens, d, vocab.sos_id, vocab.eos_id, vocab.pad_id)[0]
                        for d in DIRECTIONS])
    assert torch.equal(inputs, golden["input.tgt"])
    memory, mask = encode(fixture)
    with torch.no_grad():
        out = model.decoder(memory, mask, tokens)
    assert torch.equal(out.targets.masked_fill(out.targets == IGNORE_INDEX, vocab.pad_id), golden["input.out"])
    assert out.directions == ["l2r", "l2r", "r2l", "r2l"]
    assert out.hidden.shape == (4, golden["input.tgt"].shape[1], hidden_size)
    torch.testing.assert_close(out.logits, golden["logits"], **TOL)
    with torch.no_grad():
        for i, direction in enumerate(DIRECTIONS):
            logits, _ = model.decoder.teacher_forced(memory, mask, tokens, direction)
            torch.testing.assert_close(logits, golden["logits"][2 * i:2 * i + 2], **TOL)


def check_single_image_scores(fixture: dict) -> None:
    """``model.score`` of each fixture image alone = the official log-probability of its caption, both ways."""
    from PIL import Image

    cases = fixture["scores"]["cases"]
    images = [Image.open(fixture["dir"] / c["image_file"]) for c in cases]
    captions = [c["caption"] for c in cases]
    for direction in DIRECTIONS:
        scores = fixture["model"].score(images, captions, direction=direction)
        expected = torch.tensor([c[f"{direction}_logprob"] for c in cases], dtype=torch.float32)
        torch.testing.assert_close(scores, expected, **SCORE_TOL)


def step_logits(decoder, memory: torch.Tensor, mask: torch.Tensor, inputs: torch.Tensor, direction: str,
                reorder_at: int | None = None) -> torch.Tensor:
    """Logits of feeding ``inputs`` one column at a time through init_state/step; with ``reorder_at`` the rows are
    reversed at that step through reorder_state (beam bookkeeping) and the logits put back in input order."""
    state = decoder.init_state(memory, mask, direction)
    order = torch.arange(inputs.shape[0])
    outputs = []
    for t in range(inputs.shape[1]):
        if t == reorder_at:
            perm = torch.arange(inputs.shape[0] - 1, -1, -1)
            state = decoder.reorder_state(state, perm)
            order = order[perm]
        logits, state = decoder.step(state, inputs[order, t])
        out = torch.empty_like(logits)
        out[order] = logits
        outputs.append(out)
    return torch.stack(outputs, dim=1)


def check_incremental(fixture: dict, direction: str, reorder_at: int, inputs: torch.Tensor | None = None,
                      golden_logits: torch.Tensor | None = None, valid_only: bool = False) -> None:
    """Step-by-step decoding of the fixture batch, with and without reordering the rows at ``reorder_at``, equals
    teacher forcing (at the target positions only, with ``valid_only``) and, when given, the official logits.

    ``inputs``: the decoder's input columns (default: hmerzoo's teacher-forcing rows, ``<pad>``-padded).
    """
    model, tokens = fixture["model"], fixture["tokens"]
    vocab = model.vocab
    memory, mask = encode(fixture)
    with torch.no_grad():
        teacher, targets = model.decoder.teacher_forced(memory, mask, tokens, direction)
        if inputs is None:
            inputs, _ = teacher_forcing_tensors(tokens, direction, vocab.sos_id, vocab.eos_id, vocab.pad_id)
        stepped = step_logits(model.decoder, memory, mask, inputs, direction)
        reordered = step_logits(model.decoder, memory, mask, inputs, direction, reorder_at=reorder_at)
    where = targets != IGNORE_INDEX if valid_only else torch.ones_like(targets, dtype=torch.bool)
    torch.testing.assert_close(stepped[where], teacher[where], **TOL)
    torch.testing.assert_close(reordered[where], teacher[where], **TOL)
    if golden_logits is not None:
        torch.testing.assert_close(stepped, golden_logits, **TOL)
        torch.testing.assert_close(reordered, golden_logits, **TOL)


def check_greedy(fixture: dict) -> None:
    """Greedy decoding of each fixture image alone reads its label, both ways."""
    golden = fixture["golden"]
    for i, sample in enumerate(fixture["meta"]["samples"]):
        image = golden[f"input.img{i}_single"]
        mask = torch.zeros(image.shape[0], *image.shape[2:], dtype=torch.bool)
        for direction in DIRECTIONS:
            assert fixture["model"].greedy(image, mask, direction=direction) == [sample["token_ids"]]


# ---------------------------------------------------------------------------------------------------------------
# checks of the goldens made in this repository (tests/goldens/<name>, ``tools/gen_<name>_goldens.py``)
BEAM_SCORE_TOL = 1e-4  # a search score against the official one


def golden_rows(golden: dict[str, torch.Tensor], prefix: str) -> list[list[int]]:
    """The -1-padded ``<prefix>_tokens`` rows of a golden cut to their ``<prefix>_lengths``."""
    return [golden[f"{prefix}_tokens"][i, :n].tolist() for i, n in enumerate(golden[f"{prefix}_lengths"].tolist())]


def check_stepped_logits(fixture: dict, direction: str, logits_key: str = "logits",
                         reorder_ats: tuple[int | None, ...] = (3,)) -> None:
    """Step-by-step decoding of the fixture batch in ``direction`` (rows reversed through reorder_state at each of
    ``reorder_ats``; None: never) gives the official teacher-forced logits ``golden[logits_key]`` of that direction
    (its rows: L2R then R2L)."""
    model, golden, tokens = fixture["model"], fixture["golden"], fixture["tokens"]
    vocab = model.vocab
    inputs, _ = teacher_forcing_tensors(tokens, direction, vocab.sos_id, vocab.eos_id, vocab.pad_id)
    offset = 0 if direction == "l2r" else 2
    with torch.no_grad():
        stepped = [step_logits(model.decoder, fixture["memory"], fixture["mask"], inputs, direction, reorder_at=r)
                   for r in reorder_ats]
    for logits in stepped:
        torch.testing.assert_close(logits, golden[logits_key][offset:offset + 2], **TOL)


def check_batched_beam_search(fixture: dict, mode: str) -> tuple[list, list]:
    """The search of ``mode`` on the encoded fixture batch gives the official best hypothesis and score per image
    and every official first-pass hypothesis with its score (L2R heaps of all images, then R2L heaps, tokens in
    reading order). Returns the search results and those first-pass hypotheses in the official order."""
    from hmerzoo.config import DecodeConfig
    from hmerzoo.decoding import search

    model, golden = fixture["model"], fixture["golden"]
    vocab = model.vocab
    config = DecodeConfig(mode=mode, beam_size=10, max_len=200, alpha=1.0)
    with torch.no_grad():
        results = search(model.decoder, fixture["memory"], fixture["mask"], config, sos_id=vocab.sos_id,
                         eos_id=vocab.eos_id)
    assert [r.best.tokens for r in results] == golden_rows(golden, "beam")
    torch.testing.assert_close(torch.tensor([r.best_score for r in results]), golden["beam_scores"],
                               atol=BEAM_SCORE_TOL, rtol=0)
    beam = len(results[0].hypotheses) // 2
    ordered = [h for r in results for h in r.hypotheses[:beam]] + [h for r in results for h in r.hypotheses[beam:]]
    assert [h.tokens[::-1] if h.direction == "r2l" else h.tokens for h in ordered] == \
        golden_rows(golden, "beam_pass1")
    torch.testing.assert_close(torch.tensor([h.search_score for h in ordered]), golden["beam_pass1_scores"],
                               atol=BEAM_SCORE_TOL, rtol=0)
    return results, ordered


def check_single_images_search(fixture: dict, **recognize: object) -> None:
    """``model.recognize`` (beam 10, plus ``recognize``) of each fixture image alone, read from its 8-bit PNG as
    the official code did (value / 255), gives the official best hypothesis and score."""
    import numpy as np
    from PIL import Image

    model, golden = fixture["model"], fixture["golden"]
    for i in range(len(fixture["meta"]["samples"])):
        pixels = np.array(Image.open(fixture["dir"] / f"image{i}.png"), dtype=np.float32) / 255.0
        recognized = model.recognize(torch.from_numpy(pixels)[None], beam_size=10, **recognize)[0]
        assert recognized.tokens == golden[f"beam_single{i}_tokens"].tolist()
        assert abs(recognized.score - float(golden[f"beam_single{i}_score"])) < BEAM_SCORE_TOL


def train_two_steps(recipe: str, overrides: list[str], sample_root: Path, tmp_path: Path) -> tuple[Path, list]:
    """Train ``recipe`` (with ``overrides``) for two CPU steps on the sample data; checks that both steps were
    logged and returns the run directory and the two loss records."""
    from rich.console import Console

    from hmerzoo.trainer import train

    config = hmerzoo.load_recipe(recipe, overrides + [
        f"data.root={sample_root}", "data.num_workers=0", "data.val_holdout=4", "data.batch_size=2",
        "data.max_image_pixels=20000", "train.max_steps=2", "train.val_every=0", "train.log_every=1",
        "train.device=cpu", f"train.output_dir={tmp_path}"])
    run_dir = train(config, console=Console(file=open(tmp_path / "log.txt", "w"), highlight=False))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    return run_dir, steps
