"""Decoding: one batched beam search for every decoder, the decoding modes built on it, and recognition.

- :mod:`.beam`: :func:`beam_search`, the one search loop over images x directions x beams, driven through a
  decoder's ``init_state`` / ``step`` / ``reorder_state``;
- :mod:`.policies`: its finishing rules (:class:`BTTRFinishing` for BTTR and ABM, :class:`HFFinishing` for CoMER);
- :mod:`.rescoring`: the bidirectional modes' second passes;
- :mod:`.modes`: ``l2r``, ``r2l``, ``bttr``, ``abm``, ``comer`` in :data:`hmerzoo.registry.SEARCH_MODES`,
  :func:`search`;
- :mod:`.recognize`: images -> search results, per image or padded;
- :mod:`.prefix`: :class:`PrefixRecomputingDecoder`, the official re-run-the-prefix decoding, for benchmarks.
"""
from .beam import Hypothesis, beam_search
from .modes import SearchResult, choose_best, search
from .policies import BTTRFinishing, FinishedHeap, FinishingRule, HFFinishing
from .prefix import PrefixRecomputingDecoder
from .recognize import decode_config, recognize_tensors
from .rescoring import rate_by_opposite_direction, rescore_by_opposite_direction

__all__ = ["Hypothesis", "beam_search", "SearchResult", "choose_best", "search", "BTTRFinishing", "FinishedHeap",
           "FinishingRule", "HFFinishing", "PrefixRecomputingDecoder", "decode_config", "recognize_tensors",
           "rate_by_opposite_direction", "rescore_by_opposite_direction"]
