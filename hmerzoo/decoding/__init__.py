"""Decoding: one batched beam search for every decoder, the decoding modes built on it, and recognition.

- :mod:`.beam`: :func:`beam_search` over images x beams through a decoder's ``init_state`` / ``step`` /
  ``reorder_state``, with a :class:`SearchPolicy` for what is kept and when a beam ends;
- :mod:`.modes`: ``l2r``, ``r2l``, ``bttr`` (bidirectional, cross-direction rescoring), ``abm`` and ``comer``
  (:mod:`.comer_search`: CoMER's HF-style scorer over both directions in one batch), :func:`search`;
- :mod:`.recognize`: images -> search results, per image or padded;
- :mod:`.prefix`: :class:`PrefixRecomputingDecoder`, the official re-run-the-prefix decoding, for benchmarks.
"""
from .beam import BTTR_POLICY, Hypothesis, SearchPolicy, beam_search
from .modes import MODES, SearchResult, choose_best, rescore_by_opposite_direction, search
from .prefix import PrefixRecomputingDecoder
from .recognize import decode_config, recognize_tensors

__all__ = ["BTTR_POLICY", "Hypothesis", "SearchPolicy", "beam_search", "MODES", "SearchResult", "choose_best",
           "rescore_by_opposite_direction", "search", "PrefixRecomputingDecoder", "decode_config",
           "recognize_tensors"]
