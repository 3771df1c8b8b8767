"""Decoding modes (the recipe's ``decode.mode``): which beams run, how hypotheses are rescored, which one wins.

- ``l2r`` / ``r2l``: one beam per image in that direction; the best of its hypotheses by ``score / len**alpha``.
- ``abm``: the official ABM search (``gen_sample_bidirection`` + test.py): one L2R beam per image, the best of its
  hypotheses by ``score / (len + 1)**alpha`` (the stop token counted), see :func:`abm_direction`.
- ``bttr``: the official BTTR ``beam_search``: per image an L2R and an R2L beam (all in one batch), every
  hypothesis rescored by the opposite direction (``score += log p(tokens + stop)`` in one teacher-forced pass over
  all hypotheses of all images), then the best of the 2 x beam hypotheses by ``score / len**alpha``, ties going to
  the earlier one (L2R hypotheses first, each beam in finishing order) as Python's ``max`` does.

- ``comer``: the official CoMER search (:mod:`.comer_search`): L2R and R2L beams of every image in one batch
  with HF ``BeamSearchScorer`` semantics (``sum log p / len**alpha``, the start token counted), every hypothesis
  rated by the opposite direction (``-sum CE / len**alpha``), the best of the 2 x beam by the sum of both.

A new mode is a function ``(decoder, memory, mask, config, sos_id, eos_id, stepper) ->
list[SearchResult]`` in :data:`MODES`, usually a :class:`~hmerzoo.decoding.beam.SearchPolicy` for
:func:`~hmerzoo.decoding.beam.beam_search` plus its own rescoring and final choice.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from ..config import DecodeConfig
from ..errors import did_you_mean
from .beam import BTTR_POLICY, Hypothesis, beam_search

OPPOSITE = {"l2r": "r2l", "r2l": "l2r"}


@dataclass
class SearchResult:
    """One image's outcome: the chosen hypothesis, its ranking score, and every hypothesis the mode ranked."""

    best: Hypothesis
    best_score: float
    hypotheses: list[Hypothesis]


def length_normalised(hypotheses: Sequence[Hypothesis], alpha: float) -> torch.Tensor:
    """``score / len**alpha`` of each hypothesis, [n] float32 (the official computes it on float32 scores)."""
    scores = torch.tensor([h.score for h in hypotheses], dtype=torch.float32)
    lengths = torch.tensor([float(h.length) ** alpha for h in hypotheses], dtype=torch.float32)
    return scores / lengths


def choose_best(hypotheses: list[Hypothesis], alpha: float) -> SearchResult:
    """The first hypothesis with the highest ``score / len**alpha`` (``torch.argmax`` returns the first maximum,
    as Python's ``max`` keeps the first of equal keys)."""
    ranking = length_normalised(hypotheses, alpha)
    best = int(torch.argmax(ranking))
    return SearchResult(best=hypotheses[best], best_score=float(ranking[best]), hypotheses=hypotheses)


def log_likelihood(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, tokens: list[list[int]],
                   direction: str, memory_index: torch.Tensor) -> torch.Tensor:
    """Summed log-probability (stop token included) of each sequence on memory row ``memory_index[i]``, [n]."""
    from ..decoders.base import SequenceDecoder

    if isinstance(decoder, SequenceDecoder):
        return decoder.log_likelihood(memory, memory_mask, tokens, direction, memory_index=memory_index)
    # a decoder outside the base class: hand it one memory row per sequence
    return decoder.log_likelihood(memory.index_select(0, memory_index), memory_mask.index_select(0, memory_index),
                                  tokens, direction)


def rescore_by_opposite_direction(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor,
                                  per_image: list[list[Hypothesis]]) -> None:
    """BTTR's ``_cross_rate_score`` for all images at once: ``score += log p`` of each hypothesis under the other
    direction (in place). One teacher-forced pass per direction over every image's hypotheses."""
    for found_by in ("l2r", "r2l"):
        items = [(i, h) for i, hyps in enumerate(per_image) for h in hyps if h.direction == found_by]
        if not items:
            continue
        index = torch.tensor([i for i, _ in items], dtype=torch.long, device=memory.device)
        rated = log_likelihood(decoder, memory, memory_mask, [h.tokens for _, h in items], OPPOSITE[found_by],
                               index).float().cpu()
        # float32 sums, as the official adds a float32 tensor to the float32 search score
        totals = torch.tensor([h.score for _, h in items], dtype=torch.float32) + rated
        for (_, h), total in zip(items, totals.tolist()):
            h.score = total


def one_direction(direction: str) -> Callable[..., list[SearchResult]]:
    def run(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, config: DecodeConfig, *, sos_id: int,
            eos_id: int, stepper: Any = None) -> list[SearchResult]:
        beams = beam_search(stepper or decoder, memory, memory_mask, [direction] * memory.shape[0], sos_id=sos_id,
                            eos_id=eos_id, beam_size=config.beam_size, max_len=config.max_len, policy=BTTR_POLICY)
        return [choose_best(hyps, config.alpha) for hyps in beams]

    run.__name__ = f"{direction}_search"
    return run


def bttr_search(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, config: DecodeConfig, *, sos_id: int,
                eos_id: int, stepper: Any = None) -> list[SearchResult]:
    """BTTR's bidirectional search with cross-direction rescoring (see the module docstring)."""
    n = memory.shape[0]
    images = torch.arange(n, device=memory.device)
    beams = beam_search(stepper or decoder, memory, memory_mask, ["l2r"] * n + ["r2l"] * n, sos_id=sos_id,
                        eos_id=eos_id, beam_size=config.beam_size, max_len=config.max_len, policy=BTTR_POLICY,
                        memory_index=torch.cat((images, images)))
    per_image = [beams[i] + beams[n + i] for i in range(n)]  # L2R hypotheses first, as the official returns them
    rescore_by_opposite_direction(decoder, memory, memory_mask, per_image)
    return [choose_best(hyps, config.alpha) for hyps in per_image]


def choose_best_per_emitted_token(hypotheses: list[Hypothesis], alpha: float) -> SearchResult:
    """ABM's final choice (test.py): the lowest ``cost / len(sample)**alpha`` with cost = -sum log p and the sample
    including its stop token, i.e. the highest ``score / (len(tokens) + 1)**alpha``; the first on ties, as numpy's
    argmin. A hypothesis cut off at ``max_len`` has no stop token (the official returns none such)."""
    scores = torch.tensor([h.score for h in hypotheses], dtype=torch.float32)
    lengths = torch.tensor([float(len(h.tokens) + int(h.finished)) ** alpha for h in hypotheses],
                           dtype=torch.float32)
    ranking = scores / lengths.clamp_min(1.0)
    best = int(torch.argmax(ranking))
    return SearchResult(best=hypotheses[best], best_score=float(ranking[best]), hypotheses=hypotheses)


def abm_direction(direction: str) -> Callable[..., list[SearchResult]]:
    """ABM's ``gen_sample_bidirection`` in one direction (ABM decodes with L2R). Its search keeps the ``beam -
    finished`` best candidates of all live hypotheses x vocabulary by the summed -log p, finishes those ending with
    the stop token and stops when ``beam`` have finished - the BTTR policy's semantics; only the final choice
    differs: :func:`choose_best_per_emitted_token`."""
    def run(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, config: DecodeConfig, *, sos_id: int,
            eos_id: int, stepper: Any = None) -> list[SearchResult]:
        beams = beam_search(stepper or decoder, memory, memory_mask, [direction] * memory.shape[0], sos_id=sos_id,
                            eos_id=eos_id, beam_size=config.beam_size, max_len=config.max_len, policy=BTTR_POLICY)
        return [choose_best_per_emitted_token(hyps, config.alpha) for hyps in beams]

    run.__name__ = f"abm_{direction}_search"
    return run


def comer_mode(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, config: DecodeConfig, *, sos_id: int,
               eos_id: int, stepper: Any = None) -> list[SearchResult]:
    """The official CoMER search: L2R and R2L beams of every image in one HF-style batch, each hypothesis rated
    by the opposite direction, the best of the 2 x beam by own + reverse score (see :mod:`.comer_search`)."""
    from .comer_search import comer_search

    pad_id = getattr(decoder, "pad_id", None)
    if pad_id is None:
        raise ValueError("decode.mode comer rescores with <pad>-padded teacher forcing; the decoder has no pad_id")
    found = comer_search(decoder, memory, memory_mask, sos_id=sos_id, eos_id=eos_id, pad_id=pad_id,
                         beam_size=config.beam_size, max_len=config.max_len, alpha=config.alpha,
                         temperature=getattr(config, "temperature", 1.0), stepper=stepper)
    return [SearchResult(best=hyps[best], best_score=score, hypotheses=hyps) for hyps, best, score in found]


MODES: dict[str, Callable[..., list[SearchResult]]] = {
    "l2r": one_direction("l2r"),
    "r2l": one_direction("r2l"),
    "bttr": bttr_search,
    "abm": abm_direction("l2r"),
    "comer": comer_mode,
}
PLANNED_MODES: tuple[str, ...] = ()  # in DecodeConfig's documentation, not implemented yet


def search(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, config: DecodeConfig, *, sos_id: int,
           eos_id: int, stepper: Any = None) -> list[SearchResult]:
    """Decode every memory row [B,...] with ``config.mode``; ``stepper`` replaces the decoder's incremental
    interface (e.g. :class:`~hmerzoo.decoding.prefix.PrefixRecomputingDecoder`), ``decoder`` still rescores."""
    run = mode_function(config.mode)
    return run(decoder, memory, memory_mask, config, sos_id=sos_id, eos_id=eos_id, stepper=stepper)


def mode_function(mode: str) -> Callable[..., list[SearchResult]]:
    if mode in MODES:
        return MODES[mode]
    if mode in PLANNED_MODES:
        raise NotImplementedError(f"decode.mode {mode!r} is not implemented yet; available: {', '.join(MODES)}")
    raise ValueError(f"decode.mode: unknown mode {mode!r}{did_you_mean(mode, list(MODES))}; "
                     f"available: {', '.join(MODES)}")
