"""Finishing rules of the search loop (:func:`~hmerzoo.decoding.beam.beam_search`): what each beam keeps per step,
when a hypothesis finishes and when a beam ends.

- :class:`BTTRFinishing`: the official BTTR ``_beam_search``, which ABM's ``gen_sample_bidirection`` shares;
- :class:`HFFinishing`: CoMER's search, a fork of the HF transformers ``BeamSearchScorer`` (``FinishedHeap``,
  2 x beam candidates, the early-stop rule, ``finalize``, the official's off-by-one kept).
"""
from __future__ import annotations

from dataclasses import dataclass, field



class FinishingRule:
    """What one search keeps and when it stops, for ``num_groups`` beams of ``beam_size`` (one instance per search).

    A rule works on the host, on the values of the search's one read per step, so it never waits for the device.
    The loop calls, each step ``t`` (0-based: ``t`` tokens decoded before the step): :meth:`num_candidates`, ranks
    that many candidates per group, :meth:`select` per group, :meth:`finish` for the finishing ones (groups in
    order, each in rank order), :meth:`done`; after :meth:`num_steps` steps, :meth:`out_of_steps` with the live
    rows. :meth:`hypotheses` gives each group's result (tokens in decoding order).
    """

    def __init__(self, beam_size: int, num_groups: int):
        self.beam_size = beam_size
        self.num_groups = num_groups

    def num_steps(self, max_len: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def num_candidates(self) -> list[int]:  # pragma: no cover - interface
        """How many ranked candidates each group looks at (0: the group is done)."""
        raise NotImplementedError

    def select(self, ends: list[bool | None]) -> tuple[list[int], list[int]]:
        """One group's ranked candidates (``ends[i]``: whether the candidate of rank i is the group's stop token;
        None: not a real candidate, a padding cell of the search's grid) -> (the ranks that finish, those that go
        on), both ascending."""
        raise NotImplementedError  # pragma: no cover - interface

    def finish(self, group: list[int], tokens: list[list[int]], scores: list[float], t: int) -> None:
        raise NotImplementedError  # pragma: no cover - interface

    def done(self, best_going_on: list[float], t: int) -> list[bool]:
        """Groups over after this step; ``best_going_on``: each group's best continuing score (-inf: none)."""
        raise NotImplementedError  # pragma: no cover - interface

    def out_of_steps(self, group: list[int], tokens: list[list[int]], scores: list[float], t: int) -> None:
        """The live rows (by group, in rank order) after the last step, ``t`` tokens each."""
        raise NotImplementedError  # pragma: no cover - interface

    def hypotheses(self, g: int) -> list[tuple[list[int], float, bool]]:
        """Group g's result: (tokens in decoding order, score, finished) in the rule's order."""
        raise NotImplementedError  # pragma: no cover - interface


class BTTRFinishing(FinishingRule):
    """BTTR's (and ABM's) rule: at step t a group keeps the best ``beam - finished`` candidates; a candidate ending
    with the stop token finishes with its summed log-probability; the group ends when ``beam`` hypotheses have
    finished or after ``max_len`` steps, and if none finished, its best live hypothesis (``max_len`` tokens) is
    returned unfinished (the official ``hypotheses[0]``). Hypotheses in finishing order."""

    def __init__(self, beam_size: int, num_groups: int):
        super().__init__(beam_size, num_groups)
        self.num_finished = [0] * num_groups
        self.found: list[list[tuple[list[int], float, bool]]] = [[] for _ in range(num_groups)]

    def num_steps(self, max_len: int) -> int:
        return max_len

    def num_candidates(self) -> list[int]:
        return [max(self.beam_size - n, 0) for n in self.num_finished]

    def select(self, ends: list[bool | None]) -> tuple[list[int], list[int]]:
        return [i for i, e in enumerate(ends) if e is True], [i for i, e in enumerate(ends) if e is False]

    def finish(self, group: list[int], tokens: list[list[int]], scores: list[float], t: int) -> None:
        for g, seq, score in zip(group, tokens, scores):
            self.found[g].append((seq, score, True))
            self.num_finished[g] += 1

    def done(self, best_going_on: list[float], t: int) -> list[bool]:
        return [n >= self.beam_size for n in self.num_finished]

    def out_of_steps(self, group: list[int], tokens: list[list[int]], scores: list[float], t: int) -> None:
        for g, seq, score in zip(group, tokens, scores):
            if not self.found[g]:  # the first live row of a group is its best
                self.found[g].append((seq, score, False))

    def hypotheses(self, g: int) -> list[tuple[list[int], float, bool]]:
        return self.found[g]


@dataclass
class FinishedHeap:
    """The official ``BeamHypotheses``: at most ``size`` finished hypotheses in insertion order (the worst evicted)."""

    size: int
    alpha: float
    beams: list[tuple[float, list[int], bool]] = field(default_factory=list)  # (score, tokens, finished)
    worst_score: float = 1e9

    def add(self, tokens: list[int], sum_logprobs: float, length: int, finished: bool = True) -> None:
        """``length``: the decoder-input length of the hypothesis, start token included."""
        score = sum_logprobs / (length ** self.alpha)
        if len(self.beams) < self.size or score > self.worst_score:
            self.beams.append((score, tokens, finished))
            if len(self.beams) > self.size:
                ranked = sorted((s, i) for i, (s, _, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        if len(self.beams) < self.size:
            return False
        return self.worst_score >= best_sum_logprobs / cur_len ** self.alpha


class HFFinishing(FinishingRule):
    """CoMER's rule (official ``generation_utils.py`` + ``beam_search.py``). Per group and step:

    - the best ``2 * beam`` candidates in rank order are looked at;
    - a candidate emitting the stop token finishes only if its rank is below ``beam``: it goes into the group's
      :class:`FinishedHeap` with ``sum log p / len**alpha``, ``len`` counting the start token and not the stop
      token; the other candidates continue until ``beam`` continue;
    - the group is done once its heap holds ``beam`` hypotheses and its worst is at least
      ``best continuing sum / cur_len**alpha`` (``early_stopping`` false; ``cur_len``: the rows' length before the
      step, start token included - the official's off-by-one kept);
    - at most ``max_len - 1`` steps (``while cur_len < max_len``); then the live rows of the groups not done join
      their heaps unfinished (``finalize``). A done group's rows leave the batch (the official keeps computing them
      as padding, which changes nothing of the others).
    """

    def __init__(self, beam_size: int, num_groups: int, alpha: float = 1.0):
        super().__init__(beam_size, num_groups)
        self.heaps = [FinishedHeap(beam_size, alpha) for _ in range(num_groups)]
        self.is_done = [False] * num_groups

    def num_steps(self, max_len: int) -> int:
        return max_len - 1

    def num_candidates(self) -> list[int]:
        return [0 if done else 2 * self.beam_size for done in self.is_done]

    def select(self, ends: list[bool | None]) -> tuple[list[int], list[int]]:
        # the official loop stops at the beam-th continuing candidate; a stop token ranked after it has rank
        # >= beam and is ignored anyway
        going_on = [i for i, e in enumerate(ends) if e is False][:self.beam_size]
        if len(going_on) < self.beam_size and any(e is not None for e in ends):
            raise RuntimeError("comer search: fewer than beam continuing candidates (vocabulary too small for "
                               "2 x beam candidates)")
        return [i for i, e in enumerate(ends) if e is True and i < self.beam_size], going_on

    def finish(self, group: list[int], tokens: list[list[int]], scores: list[float], t: int) -> None:
        for g, seq, score in zip(group, tokens, scores):
            self.heaps[g].add(seq, score, t + 1)

    def done(self, best_going_on: list[float], t: int) -> list[bool]:
        for g, best in enumerate(best_going_on):
            if not self.is_done[g] and best != float("-inf") and self.heaps[g].is_done(best, t + 1):
                self.is_done[g] = True
        return list(self.is_done)

    def out_of_steps(self, group: list[int], tokens: list[list[int]], scores: list[float], t: int) -> None:
        for g, seq, score in zip(group, tokens, scores):
            self.heaps[g].add(seq, score, t + 1, finished=False)

    def hypotheses(self, g: int) -> list[tuple[list[int], float, bool]]:
        return [(seq, score, finished) for score, seq, finished in self.heaps[g].beams]
