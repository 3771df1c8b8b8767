"""CoMER's search (official ``comer/utils/generation_utils.py`` + ``beam_search.py``, a fork of the HF
transformers ``BeamSearchScorer``), driven through a decoder's ``init_state`` / ``step`` / ``reorder_state``.

Every image is searched twice in ONE batch of decoder rows: group i starts with the L2R start token, group n + i
with the R2L one (the official doubled batch). Per group, each step:

- ranks ``score + log_softmax`` over all its rows x vocabulary and looks at the best ``2 * beam`` candidates in
  rank order;
- a candidate emitting the stop token of the group's direction finishes (only if its rank is below ``beam``): it
  goes into the group's :class:`FinishedHeap` with the score ``sum log p / len**alpha``, ``len`` counting the start
  token and not the stop token; every other candidate continues until ``beam`` rows continue;
- the group is done once its heap holds ``beam`` hypotheses and the worst of them is at least
  ``best live sum / cur_len**alpha`` (``early_stopping`` false; ``cur_len``: the rows' length before the step,
  start token included - the official's off-by-one kept).

The loop runs while ``cur_len < max_len`` (at most ``max_len - 1`` tokens) and some group is not done; then the
live rows of the groups not done go into their heaps (``finalize``). A done group's rows leave the batch (the
official keeps computing them as padding, which changes nothing of the others).

Rescoring (:func:`rate_by_opposite_direction`): R2L hypotheses are flipped to reading order and every hypothesis
is rated by the opposite direction, ``-sum CE / (#non-pad decoder inputs)**alpha`` (the start token counted,
``<pad>`` targets ignored), one teacher-forced pass over all hypotheses; final score = first-pass score + rate,
and each image keeps the first maximum over its 2 x beam hypotheses (L2R heap order, then R2L heap order).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..sequence import direction_tokens
from .beam import Hypothesis


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


def comer_first_pass(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, directions: list[str], *,
                     sos_id: int, eos_id: int, beam_size: int, max_len: int, alpha: float,
                     temperature: float = 1.0) -> list[FinishedHeap]:
    """The official ``_beam_search`` over groups = memory rows (group g in ``directions[g]``); returns each
    group's heap, hypotheses in the decoding direction (start token dropped)."""
    device = memory.device
    num_groups = len(directions)
    stops = [direction_tokens(sos_id, eos_id, d)[1] for d in directions]
    start = torch.tensor([direction_tokens(sos_id, eos_id, d)[0] for d in directions], dtype=torch.long,
                         device=device)
    mixed = len(set(directions)) > 1
    if mixed and not getattr(decoder, "supports_mixed_directions", False):
        raise ValueError("decode.mode comer searches L2R and R2L rows in one batch; this decoder cannot mix "
                         "directions in one state (supports_mixed_directions)")
    state = decoder.init_state(memory, memory_mask, list(directions) if mixed else directions[0])
    heaps = [FinishedHeap(beam_size, alpha) for _ in range(num_groups)]

    active = list(range(num_groups))  # groups with live rows, in order; each has rows_per_group rows
    rows_per_group = 1
    row_score = torch.zeros(num_groups, dtype=torch.float32, device=device)
    history: list[list[int]] = [[] for _ in range(num_groups)]  # tokens after the start token, per row
    last = start
    cur_len = 1
    while cur_len < max_len and active:
        logits, state = decoder.step(state, last)
        vocab_size = logits.shape[-1]
        scores = F.log_softmax(logits.float() / temperature, dim=-1) + row_score[:, None]
        k = min(2 * beam_size, rows_per_group * vocab_size)
        top_score, top_pos = scores.view(len(active), rows_per_group * vocab_size).topk(k, dim=1)
        top_slot = torch.div(top_pos, vocab_size, rounding_mode="floor").tolist()
        top_word = (top_pos % vocab_size).tolist()
        top_values = top_score.tolist()  # python floats of the float32 scores, as ``.item()``

        next_active, next_rows, next_words, next_scores = [], [], [], []
        for a, g in enumerate(active):
            heap = heaps[g]
            chosen_rows, chosen_words, chosen_scores = [], [], []
            for rank in range(k):
                row = a * rows_per_group + top_slot[a][rank]
                word = top_word[a][rank]
                if word == stops[g]:
                    if rank >= beam_size:
                        continue
                    heap.add(history[row], top_values[a][rank], cur_len)
                else:
                    chosen_rows.append(row)
                    chosen_words.append(word)
                    chosen_scores.append(top_values[a][rank])
                if len(chosen_rows) == beam_size:
                    break
            if len(chosen_rows) < beam_size:
                raise RuntimeError("comer search: fewer than beam continuing candidates (vocabulary too small "
                                   "for 2 x beam candidates)")
            if heap.is_done(max(chosen_scores), cur_len):
                continue
            next_active.append(g)
            next_rows += chosen_rows
            next_words += chosen_words
            next_scores += chosen_scores
        cur_len += 1
        history = [history[r] + [w] for r, w in zip(next_rows, next_words)]
        active = next_active
        rows_per_group = beam_size
        if not active:
            break
        rows = torch.tensor(next_rows, dtype=torch.long, device=device)
        last = torch.tensor(next_words, dtype=torch.long, device=device)
        row_score = torch.tensor(next_scores, dtype=torch.float32, device=device)
        state = decoder.reorder_state(state, rows)

    # finalize: the live rows of the groups not done join their heaps, with the length of the rows
    for a, g in enumerate(active):
        for r in range(a * rows_per_group, (a + 1) * rows_per_group):
            heaps[g].add(history[r], float(row_score[r]), cur_len, finished=False)
    return heaps


def rate_by_opposite_direction(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor,
                               tokens: list[list[int]], directions: list[str], *, sos_id: int, eos_id: int,
                               pad_id: int, alpha: float, temperature: float = 1.0) -> torch.Tensor:
    """The official ``_rate``: sequence i (reading order) on memory row i, rated in ``directions[i]``:
    ``-sum CE / (#non-pad decoder inputs)**alpha``, ``<pad>`` targets ignored. [N] float32; one pass, all rows
    padded to the longest, as the official."""
    device = memory.device
    length = max(len(t) for t in tokens) + 1
    inputs = torch.full((len(tokens), length), pad_id, dtype=torch.long, device=device)
    targets = torch.full((len(tokens), length), pad_id, dtype=torch.long, device=device)
    for i, (seq, d) in enumerate(zip(tokens, directions)):
        begin, stop = direction_tokens(sos_id, eos_id, d)
        body = seq[::-1] if d == "r2l" else seq
        inputs[i, 0] = begin
        if body:
            inputs[i, 1:1 + len(body)] = torch.tensor(body, dtype=torch.long)
            targets[i, :len(body)] = torch.tensor(body, dtype=torch.long)
        targets[i, len(body)] = stop
    mixed = len(set(directions)) > 1
    logits = decoder.prefix_logits(memory, memory_mask, inputs, list(directions) if mixed else directions[0])
    ce = F.cross_entropy(logits.float().flatten(0, 1) / temperature, targets.flatten(), ignore_index=pad_id,
                         reduction="none").view(len(tokens), length)
    penalty = (inputs != pad_id).sum(dim=1) ** alpha
    return -ce.sum(dim=1) / penalty


def comer_search(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, *, sos_id: int, eos_id: int,
                 pad_id: int, beam_size: int, max_len: int, alpha: float, temperature: float = 1.0,
                 stepper: Any = None) -> list[tuple[list[Hypothesis], int, float]]:
    """Per memory row (image): (its 2 x beam hypotheses, L2R first, the index of the best, its final score)."""
    n = memory.shape[0]
    index = torch.cat((torch.arange(n), torch.arange(n))).to(memory.device)
    directions = ["l2r"] * n + ["r2l"] * n
    heaps = comer_first_pass(stepper or decoder, memory.index_select(0, index), memory_mask.index_select(0, index),
                             directions, sos_id=sos_id, eos_id=eos_id, beam_size=beam_size, max_len=max_len,
                             alpha=alpha, temperature=temperature)
    hyps: list[Hypothesis] = []
    rows: list[int] = []
    for g, heap in enumerate(heaps):
        for score, seq, finished in heap.beams:
            reverse = directions[g] == "r2l"
            hyps.append(Hypothesis(tokens=seq[::-1] if reverse else list(seq), score=score, search_score=score,
                                   direction=directions[g], finished=finished))
            rows.append(g % n)
    first = torch.tensor([h.search_score for h in hyps], dtype=torch.float32)  # the official float32 scores
    row_index = torch.tensor(rows, dtype=torch.long, device=memory.device)
    rated = rate_by_opposite_direction(
        decoder, memory.index_select(0, row_index), memory_mask.index_select(0, row_index),
        [h.tokens for h in hyps], ["r2l" if h.direction == "l2r" else "l2r" for h in hyps], sos_id=sos_id,
        eos_id=eos_id, pad_id=pad_id, alpha=alpha, temperature=temperature).float().cpu()
    total = first + rated
    for h, value in zip(hyps, total.tolist()):
        h.score = value
    results = []
    for i in range(n):
        picked = [j for j, r in enumerate(rows) if r == i]  # L2R heap, then R2L heap
        scores = total[picked]
        best = int(torch.argmax(scores))  # the first maximum, as torch.max
        results.append(([hyps[j] for j in picked], best, float(scores[best])))
    return results
