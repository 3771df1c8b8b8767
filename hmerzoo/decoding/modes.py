"""Decoding modes (the recipe's ``decode.mode``), registered in :data:`hmerzoo.registry.SEARCH_MODES`
(``hmerzoo list search_modes``). A mode is which beams run with which finishing rule (:mod:`.policies`), how
hypotheses are rescored (:mod:`.rescoring`) and which one wins - all on the one search loop of :mod:`.beam`.

- ``l2r`` / ``r2l``: one beam per image in that direction (BTTR's rule); the best by ``score / len**alpha``.
- ``abm``: the official ABM search (``gen_sample_bidirection`` + test.py): one L2R beam per image with BTTR's rule,
  the best by ``score / (len + 1)**alpha`` (the stop token counted), see :func:`choose_best_per_emitted_token`.
- ``bttr``: the official BTTR ``beam_search``: per image an L2R and an R2L beam (all in one batch), every
  hypothesis rescored by the opposite direction (``score += log p(tokens + stop)``), then the best of the
  2 x beam by ``score / len**alpha``, ties going to the earlier one (L2R first, each beam in finishing order).
- ``comer``: the official CoMER search: L2R and R2L beams of every image in one batch with HF ``BeamSearchScorer``
  semantics (:class:`~.policies.HFFinishing`), every hypothesis rated by the opposite direction
  (``-sum CE / len**alpha``), the best of the 2 x beam by the sum of both.
- ``tamer``: ``comer``, plus the structure score of the ``tree_structure`` head (the decoder's ``rescorer``) and
  hypotheses whose LaTeX has no tree dropped.

A new mode is a function ``(decoder, memory, mask, config, *, sos_id, eos_id, pad_id, stepper) ->
list[SearchResult]`` registered with ``@SEARCH_MODES.register("name")``.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..config import DecodeConfig
from ..errors import RecipeError, did_you_mean
from ..registry import SEARCH_MODES
from .beam import Hypothesis, beam_search
from .policies import BTTRFinishing, HFFinishing
from .rescoring import OPPOSITE, rate_by_opposite_direction, rescore_by_opposite_direction


@dataclass
class SearchResult:
    """One image's outcome: the chosen hypothesis, its ranking score, and every hypothesis the mode ranked."""

    best: Hypothesis
    best_score: float
    hypotheses: list[Hypothesis]


# The final choices run on the host (numpy float32, the official's float32 arithmetic): the scores are there already
def _pick(hypotheses: list[Hypothesis], ranking: np.ndarray) -> SearchResult:
    # argmax returns the first maximum, as Python's max keeps the first of equal keys
    best = int(np.argmax(ranking))
    return SearchResult(best=hypotheses[best], best_score=float(ranking[best]), hypotheses=hypotheses)


def _float32(values: Sequence[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def length_normalised(hypotheses: Sequence[Hypothesis], alpha: float) -> np.ndarray:
    """``score / len**alpha`` of each hypothesis, [n] float32 (the official computes it on float32 scores)."""
    return _float32([h.score for h in hypotheses]) / _float32([float(h.length) ** alpha for h in hypotheses])


def choose_best(hypotheses: list[Hypothesis], alpha: float) -> SearchResult:
    """BTTR's final choice: the first hypothesis with the highest ``score / len**alpha``."""
    return _pick(hypotheses, length_normalised(hypotheses, alpha))


def choose_best_per_emitted_token(hypotheses: list[Hypothesis], alpha: float) -> SearchResult:
    """ABM's final choice (test.py): the lowest ``cost / len(sample)**alpha`` with cost = -sum log p and the sample
    including its stop token, i.e. the highest ``score / (len(tokens) + 1)**alpha``; the first on ties, as numpy's
    argmin. A hypothesis cut off at ``max_len`` has no stop token (the official returns none such)."""
    scores = _float32([h.score for h in hypotheses])
    lengths = _float32([float(len(h.tokens) + int(h.finished)) ** alpha for h in hypotheses])
    return _pick(hypotheses, scores / np.maximum(lengths, np.float32(1.0)))


def choose_best_total(hypotheses: list[Hypothesis], alpha: float) -> SearchResult:
    """CoMER's final choice: the first maximum of first-pass score + rating (already summed in ``score``)."""
    return _pick(hypotheses, _float32([h.score for h in hypotheses]))


Mode = Callable[..., list[SearchResult]]


def one_direction(direction: str, choose: Callable[[list[Hypothesis], float], SearchResult] = choose_best,
                  name: str | None = None) -> Mode:
    """One beam per image in ``direction`` with BTTR's finishing rule, then ``choose``."""
    def run(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, config: DecodeConfig, *, sos_id: int,
            eos_id: int, pad_id: int | None = None, stepper: Any = None) -> list[SearchResult]:
        beams = beam_search(stepper or decoder, memory, memory_mask, [direction] * memory.shape[0], sos_id=sos_id,
                            eos_id=eos_id, beam_size=config.beam_size, max_len=config.max_len, rule=BTTRFinishing)
        return [choose(hyps, config.alpha) for hyps in beams]

    run.__name__ = run.__qualname__ = name or f"{direction}_search"
    run.__doc__ = f"One {direction.upper()} beam per image, BTTR's finishing rule; final choice: {choose.__name__}."
    return run


def abm_direction(direction: str) -> Mode:
    """ABM's ``gen_sample_bidirection`` in one direction (ABM decodes with L2R). Its search keeps the ``beam -
    finished`` best candidates of all live hypotheses x vocabulary by the summed -log p, finishes those ending with
    the stop token and stops when ``beam`` have finished - BTTR's rule; only the final choice differs."""
    return one_direction(direction, choose_best_per_emitted_token, name=f"abm_{direction}_search")


def _both_directions(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, config: DecodeConfig,
                     rule: Any, sos_id: int, eos_id: int) -> list[list[Hypothesis]]:
    """Per image: its L2R beam's hypotheses, then its R2L beam's, all beams in one search."""
    n = memory.shape[0]
    images = torch.arange(n, device=memory.device)
    beams = beam_search(decoder, memory, memory_mask, ["l2r"] * n + ["r2l"] * n, sos_id=sos_id, eos_id=eos_id,
                        beam_size=config.beam_size, max_len=config.max_len, rule=rule,
                        memory_index=torch.cat((images, images)))
    return [beams[i] + beams[n + i] for i in range(n)]


def bttr_search(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, config: DecodeConfig, *, sos_id: int,
                eos_id: int, pad_id: int | None = None, stepper: Any = None) -> list[SearchResult]:
    """BTTR: L2R and R2L beams, each hypothesis rescored by the other direction, best by ``score / len**alpha``."""
    per_image = _both_directions(stepper or decoder, memory, memory_mask, config, BTTRFinishing, sos_id, eos_id)
    rescore_by_opposite_direction(decoder, memory, memory_mask, per_image)
    return [choose_best(hyps, config.alpha) for hyps in per_image]


def comer_search(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, config: DecodeConfig, *,
                 sos_id: int, eos_id: int, pad_id: int | None = None, stepper: Any = None) -> list[SearchResult]:
    """CoMER: L2R and R2L beams with the HF scorer, each hypothesis rated by the other direction, best by the sum."""
    pad_id = decoder.pad_id if pad_id is None else pad_id
    if pad_id is None:
        raise ValueError("decode.mode comer rescores with <pad>-padded teacher forcing; the vocabulary has no <pad>")
    rule = partial(HFFinishing, alpha=config.alpha)
    per_image = _both_directions(stepper or decoder, memory, memory_mask, config, rule, sos_id, eos_id)
    hyps = [h for found in per_image for h in found]
    rated = rate_by_opposite_direction(
        decoder, memory, memory_mask, [h.tokens for h in hyps], [OPPOSITE[h.direction] for h in hyps],
        sos_id=sos_id, eos_id=eos_id, pad_id=pad_id, alpha=config.alpha,
        memory_rows=[i for i, found in enumerate(per_image) for _ in found]).float().cpu().numpy()
    # float32 sums of the official float32 scores
    total = _float32([h.search_score for h in hyps]) + rated
    for h, value in zip(hyps, total.tolist()):
        h.score = value
    return [choose_best_total(found, config.alpha) for found in per_image]


def tamer_search(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, config: DecodeConfig, *,
                 sos_id: int, eos_id: int, pad_id: int | None = None, stepper: Any = None) -> list[SearchResult]:
    """TAMER: CoMER's search and rating, plus each hypothesis's structure score from the decoder's ``rescorer`` (the
    ``tree_structure`` head); hypotheses whose LaTeX has no tree (illegal) score -inf. Best by the sum."""
    scorer = getattr(decoder, "rescorer", None)
    if scorer is None:
        raise ValueError("decode.mode tamer adds the structure score of a tree_structure head, and this model has "
                         "none; use decode.mode comer")
    results = comer_search(decoder, memory, memory_mask, config, sos_id=sos_id, eos_id=eos_id, pad_id=pad_id,
                           stepper=stepper)
    hyps = [h for r in results for h in r.hypotheses]
    rows = [i for i, r in enumerate(results) for _ in r.hypotheses]  # on the host: grouped without device reads
    structure, illegal = scorer.score_hypotheses(decoder, memory, memory_mask, [h.tokens for h in hyps], rows)
    total = torch.tensor([h.score for h in hyps], dtype=torch.float32) + structure
    total = total.masked_fill(torch.tensor(illegal, dtype=torch.bool), float("-inf"))
    for h, value in zip(hyps, total.tolist()):
        h.score = value
    return [choose_best_total(r.hypotheses, config.alpha) for r in results]


SEARCH_MODES.add("l2r", one_direction("l2r"))
SEARCH_MODES.add("r2l", one_direction("r2l"))
SEARCH_MODES.add("bttr", bttr_search)
SEARCH_MODES.add("abm", abm_direction("l2r"))
SEARCH_MODES.add("comer", comer_search)
SEARCH_MODES.add("tamer", tamer_search)


def search(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, config: DecodeConfig, *, sos_id: int,
           eos_id: int, pad_id: int | None = None, stepper: Any = None) -> list[SearchResult]:
    """Decode every memory row [B,...] with ``config.mode``; ``stepper`` replaces the decoder's incremental
    interface (e.g. :class:`~hmerzoo.decoding.prefix.PrefixRecomputingDecoder`), ``decoder`` still rescores."""
    run = mode_function(config.mode)
    return run(decoder, memory, memory_mask, config, sos_id=sos_id, eos_id=eos_id, pad_id=pad_id, stepper=stepper)


def mode_function(mode: str) -> Mode:
    """The registered mode ``mode`` (or a ``module.path:function``); an unknown name fails with the available ones."""
    if mode in SEARCH_MODES or ":" in mode:
        try:
            return SEARCH_MODES.get(mode, "decode.mode")
        except RecipeError as e:
            raise ValueError(str(e)) from None
    names = SEARCH_MODES.names()
    raise ValueError(f"decode.mode: unknown mode {mode!r}{did_you_mean(mode, names)}; available: {', '.join(names)}")
