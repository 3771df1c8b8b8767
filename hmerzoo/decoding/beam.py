"""One batched beam search for every decoder, driven only through ``init_state`` / ``step`` / ``reorder_state``.

A *group* is one beam: one image searched in one direction. All groups of a call share one batch of decoder rows,
N = the live hypotheses of every group, kept sorted by group and, within a group, by the rank they were chosen
with. Each step feeds every row its last token, turns the logits into candidates ``score + log_softmax``, ranks
the candidates of each group over all its rows x vocabulary at once (a padded [groups, rows x V] grid, -inf where a
group has fewer rows), and reorders the decoder state to the surviving rows. Nothing re-runs the prefix: the
decoder's state carries it.

What is kept and when a group ends is the :class:`SearchPolicy`. :class:`SearchPolicy` itself is the official BTTR
``_beam_search``: at step t a group keeps the best ``beam - finished`` candidates; a candidate ending with the stop
token finishes with its summed log-probability (sequence without start/stop tokens); the group ends when ``beam``
hypotheses have finished or after ``max_len`` steps, and if none finished, its best live hypothesis (``max_len``
tokens) is returned. Other searches (CoMER's, ABM's) are a policy that overrides these hooks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..sequence import direction_tokens


@dataclass
class Hypothesis:
    """One hypothesis a search returns.

    tokens: token ids in reading order (R2L hypotheses are flipped back), without start/stop tokens.
    search_score: its score in the search (the policy's finishing score; BTTR: summed log-probability).
    score: the score it is ranked by before length normalisation (search_score plus any rescoring).
    finished: False for a hypothesis returned because its beam had none finished after ``max_len`` steps.
    """

    tokens: list[int]
    score: float
    search_score: float
    direction: str
    finished: bool = True

    @property
    def length(self) -> int:
        """The official ``Hypothesis.__len__``: number of tokens, at least 1 (so empty hypotheses normalise)."""
        return max(len(self.tokens), 1)


class SearchPolicy:
    """The official BTTR one-direction search semantics (see the module docstring); subclass to change them."""

    def num_candidates(self, beam_size: int, num_finished: torch.Tensor) -> torch.Tensor:
        """How many candidates each group keeps this step, [G]; BTTR: the beams not finished yet."""
        return beam_size - num_finished

    def select(self, top_words: torch.Tensor, stop: torch.Tensor, valid: torch.Tensor, beam_size: int,
               num_finished: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which of the ranked candidates finish and which go on, both [G,K] bool.

        ``top_words`` [G,K]: each group's candidates in rank order; ``valid``: the candidates kept (rank below
        ``num_candidates``); ``stop`` [G]: each group's stop token. BTTR: every kept candidate either ends (stop
        token) or continues.
        """
        ends = top_words == stop[:, None]
        return valid & ends, valid & ~ends

    def finished_score(self, score: torch.Tensor, length: int) -> torch.Tensor:
        """Score a finishing hypothesis keeps; ``length``: its token count without start/stop. BTTR: the sum."""
        return score

    def group_done(self, beam_size: int, num_finished: torch.Tensor) -> torch.Tensor:
        """[G] bool: groups whose search is over; BTTR: ``beam`` hypotheses finished."""
        return num_finished >= beam_size


BTTR_POLICY = SearchPolicy()


def beam_search(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, directions: Sequence[str], *,
                sos_id: int, eos_id: int, beam_size: int, max_len: int, policy: SearchPolicy = BTTR_POLICY,
                memory_index: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """Search every group at once; returns, per group, its hypotheses in finishing order.

    ``memory`` [M,...] / ``memory_mask``: the encoded images (padded ones only if the decoder is
    ``memory_padding_invariant``). Group g searches memory row ``memory_index[g]`` (default: g) in direction
    ``directions[g]``. A decoder that cannot mix directions in one state (``supports_mixed_directions``) gets one
    batch per direction.
    """
    num_groups = len(directions)
    if memory_index is None:
        memory_index = torch.arange(memory.shape[0], device=memory.device)
    if memory_index.numel() != num_groups:
        raise ValueError(f"beam_search: {num_groups} directions for {memory_index.numel()} groups")
    if beam_size < 1 or max_len < 1:
        raise ValueError(f"beam_search: beam_size and max_len must be at least 1, got {beam_size} and {max_len}")
    kinds = sorted(set(directions))
    if len(kinds) <= 1 or getattr(decoder, "supports_mixed_directions", False):
        batches = [list(range(num_groups))]
    else:
        batches = [[g for g in range(num_groups) if directions[g] == d] for d in kinds]
    results: list[list[Hypothesis]] = [[] for _ in range(num_groups)]
    for groups in batches:
        index = memory_index[torch.tensor(groups, device=memory.device)]
        found = _search(decoder, memory.index_select(0, index), memory_mask.index_select(0, index),
                        [directions[g] for g in groups], sos_id=sos_id, eos_id=eos_id, beam_size=beam_size,
                        max_len=max_len, policy=policy)
        for g, hyps in zip(groups, found):
            results[g] = hyps
    return results


def _search(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, directions: list[str], *, sos_id: int,
            eos_id: int, beam_size: int, max_len: int, policy: SearchPolicy) -> list[list[Hypothesis]]:
    """One batch of groups; group g is memory row g."""
    device = memory.device
    num_groups = len(directions)
    ends = [direction_tokens(sos_id, eos_id, d) for d in directions]
    start = torch.tensor([s for s, _ in ends], dtype=torch.long, device=device)
    stop = torch.tensor([e for _, e in ends], dtype=torch.long, device=device)
    reverse = [d == "r2l" for d in directions]
    one_direction = directions[0] if len(set(directions)) == 1 else list(directions)
    state = decoder.init_state(memory, memory_mask, one_direction)

    # rows: live hypotheses, sorted by group, within a group in the order they were ranked
    row_group = torch.arange(num_groups, device=device)
    row_score = torch.zeros(num_groups, dtype=torch.float32, device=device)
    history = torch.empty(num_groups, 0, dtype=torch.long, device=device)  # tokens after the start token
    last = start
    num_finished = torch.zeros(num_groups, dtype=torch.long, device=device)
    rows_per_group = torch.ones(num_groups, dtype=torch.long, device=device)
    width = 1  # the most rows a group has
    finished: list[list[Hypothesis]] = [[] for _ in range(num_groups)]

    for t in range(max_len):
        logits, state = decoder.step(state, last)
        vocab_size = logits.shape[-1]
        candidates = row_score[:, None] + F.log_softmax(logits.float(), dim=-1)  # [N,V]
        first_row = torch.cumsum(rows_per_group, 0) - rows_per_group
        slot = torch.arange(row_group.numel(), device=device) - first_row[row_group]
        grid = candidates.new_full((num_groups, width, vocab_size), float("-inf"))
        grid[row_group, slot] = candidates
        keep = torch.minimum(policy.num_candidates(beam_size, num_finished), rows_per_group * vocab_size)
        keep = keep.masked_fill(policy.group_done(beam_size, num_finished), 0)
        k = int(keep.max())
        top_score, top_pos = grid.view(num_groups, width * vocab_size).topk(k, dim=1)  # sorted, best first
        source_slot = torch.div(top_pos, vocab_size, rounding_mode="floor")
        top_word = top_pos % vocab_size
        ranked = torch.arange(k, device=device)[None, :] < keep[:, None]
        valid = ranked & (source_slot < rows_per_group[:, None])  # never a padding cell of the grid
        source_row = first_row[:, None] + source_slot
        finishing, going_on = policy.select(top_word, stop, valid, beam_size, num_finished)

        if bool(finishing.any()):
            # row-major nonzero: groups in order, each group's candidates in rank order (the official order)
            fin_group, fin_rank = finishing.nonzero(as_tuple=True)
            sequences = history.index_select(0, source_row[fin_group, fin_rank]).tolist()
            scores = policy.finished_score(top_score[fin_group, fin_rank], t).tolist()
            for g, seq, score in zip(fin_group.tolist(), sequences, scores):
                finished[g].append(Hypothesis(tokens=seq[::-1] if reverse[g] else seq, score=score,
                                              search_score=score, direction=directions[g]))
            num_finished = num_finished + torch.bincount(fin_group, minlength=num_groups)
        going_on &= ~policy.group_done(beam_size, num_finished)[:, None]

        live_group, live_rank = going_on.nonzero(as_tuple=True)
        if live_group.numel() == 0:
            break
        rows = source_row[live_group, live_rank]
        history = torch.cat((history.index_select(0, rows), top_word[live_group, live_rank][:, None]), dim=1)
        if t == max_len - 1:
            # out of steps: a group with nothing finished returns its best live hypothesis (the official
            # ``hypotheses[0]``), the first continuing candidate in rank order, with all its max_len tokens
            empty = [g for g in range(num_groups) if not finished[g]]
            if empty:
                live_per_group = torch.bincount(live_group, minlength=num_groups)
                first = torch.cumsum(live_per_group, 0) - live_per_group  # live rows are sorted by group, rank
                best = first[torch.tensor(empty, device=device)]
                sequences = history.index_select(0, best).tolist()
                scores = top_score[live_group, live_rank].index_select(0, best).tolist()
                for g, seq, score in zip(empty, sequences, scores):
                    finished[g].append(Hypothesis(tokens=seq[::-1] if reverse[g] else seq, score=score,
                                                  search_score=score, direction=directions[g], finished=False))
            break
        row_group = live_group
        row_score = top_score[live_group, live_rank]
        last = top_word[live_group, live_rank]
        rows_per_group = torch.bincount(live_group, minlength=num_groups)
        width = int(rows_per_group.max())
        state = decoder.reorder_state(state, rows)
    return finished
