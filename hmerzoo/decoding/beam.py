"""The one batched beam search of every decoder and mode, driven only through ``init_state`` / ``step`` /
``reorder_state``.

A *group* is one beam: one image searched in one direction. All groups of a call share one batch of decoder rows,
N = the live hypotheses of every group, kept sorted by group and, within a group, by the rank they were chosen
with. Each step feeds every row its last token, turns the logits into candidates ``score + log_softmax``, ranks
the candidates of each group over all its rows x vocabulary at once (a padded [groups, rows x V] grid, -inf where a
group has fewer rows), and reorders the decoder state to the surviving rows. Nothing re-runs the prefix: the
decoder's state carries it. A group that is done leaves the batch, so finished images cost nothing.

What is kept, when a hypothesis finishes and when a group ends is a :class:`FinishingRule`
(:mod:`.policies`: BTTR's and ABM's rule, CoMER's HF-scorer rule); the loop knows none of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..sequence import direction_tokens
from .policies import BTTRFinishing, FinishingRule


@dataclass
class Hypothesis:
    """One hypothesis a search returns.

    tokens: token ids in reading order (R2L hypotheses are flipped back), without start/stop tokens.
    search_score: its score in the search (the rule's finishing score; BTTR: summed log-probability).
    score: the score it is ranked by before length normalisation (search_score plus any rescoring).
    finished: False for a hypothesis returned because its beam ran out of steps.
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


RuleFactory = Callable[[int, int], FinishingRule]  # (beam_size, num_groups) -> a fresh rule for one search


def beam_search(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, directions: Sequence[str], *,
                sos_id: int, eos_id: int, beam_size: int, max_len: int, rule: RuleFactory = BTTRFinishing,
                memory_index: torch.Tensor | None = None) -> list[list[Hypothesis]]:
    """Search every group at once; returns, per group, its hypotheses in the rule's order (default: BTTR's).

    ``memory`` [M,...] / ``memory_mask``: the encoded images (padded ones only if the decoder is
    ``memory_padding_invariant``). Group g searches memory row ``memory_index[g]`` (default: g) in direction
    ``directions[g]``. A decoder that cannot mix directions in one state (its declared ``capabilities``) gets one
    batch per direction; groups never interact, so that changes no result.
    """
    num_groups = len(directions)
    if memory_index is None:
        memory_index = torch.arange(memory.shape[0], device=memory.device)
    if memory_index.numel() != num_groups:
        raise ValueError(f"beam_search: {num_groups} directions for {memory_index.numel()} groups")
    if beam_size < 1 or max_len < 1:
        raise ValueError(f"beam_search: beam_size and max_len must be at least 1, got {beam_size} and {max_len}")
    kinds = sorted(set(directions))
    if len(kinds) <= 1 or decoder.capabilities.supports_mixed_directions:
        batches = [list(range(num_groups))]
    else:
        batches = [[g for g in range(num_groups) if directions[g] == d] for d in kinds]
    results: list[list[Hypothesis]] = [[] for _ in range(num_groups)]
    for groups in batches:
        index = memory_index[torch.tensor(groups, device=memory.device)]
        found = _search(decoder, memory.index_select(0, index), memory_mask.index_select(0, index),
                        [directions[g] for g in groups], sos_id=sos_id, eos_id=eos_id, max_len=max_len,
                        rule=rule(beam_size, len(groups)))
        for g, hyps in zip(groups, found):
            results[g] = hyps
    return results


def _search(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, directions: list[str], *, sos_id: int,
            eos_id: int, max_len: int, rule: FinishingRule) -> list[list[Hypothesis]]:
    """One batch of groups; group g is memory row g."""
    device = memory.device
    num_groups = len(directions)
    ends = [direction_tokens(sos_id, eos_id, d) for d in directions]
    stop = torch.tensor([e for _, e in ends], dtype=torch.long, device=device)
    last = torch.tensor([s for s, _ in ends], dtype=torch.long, device=device)
    state = decoder.init_state(memory, memory_mask, directions[0] if len(set(directions)) == 1 else directions)

    # rows: live hypotheses, sorted by group, within a group in the order they were ranked
    row_group = torch.arange(num_groups, device=device)
    row_score = torch.zeros(num_groups, dtype=torch.float32, device=device)
    history = torch.empty(num_groups, 0, dtype=torch.long, device=device)  # tokens after the start token
    rows_per_group = torch.ones(num_groups, dtype=torch.long, device=device)
    width = 1  # the most rows a group has
    steps = rule.num_steps(max_len)
    if steps == 0:
        rule.out_of_steps(row_group.tolist(), history.tolist(), row_score.tolist(), 0)
    for t in range(steps):
        logits, state = decoder.step(state, last)
        vocab_size = logits.shape[-1]
        candidates = F.log_softmax(logits.float(), dim=-1) + row_score[:, None]  # [N,V]
        first_row = torch.cumsum(rows_per_group, 0) - rows_per_group
        if width == 1 and row_group.numel() == num_groups:
            grid = candidates  # one row per group (the first step): nothing to lay out
        else:
            slot = torch.arange(row_group.numel(), device=device) - first_row[row_group]
            grid = candidates.new_full((num_groups, width, vocab_size), float("-inf"))
            grid[row_group, slot] = candidates
        keep = torch.minimum(rule.num_candidates().to(device), rows_per_group * vocab_size)
        k = int(keep.max())
        top_score, top_pos = grid.reshape(num_groups, width * vocab_size).topk(k, dim=1)  # sorted, best first
        source_slot = torch.div(top_pos, vocab_size, rounding_mode="floor")
        top_word = top_pos % vocab_size
        valid = torch.arange(k, device=device)[None, :] < keep[:, None]
        valid &= source_slot < rows_per_group[:, None]  # never a padding cell of the grid
        source_row = first_row[:, None] + source_slot
        finishing, going_on = rule.select(top_word == stop[:, None], valid)

        if bool(finishing.any()):
            # row-major nonzero: groups in order, each group's candidates in rank order (the official order)
            fin_group, fin_rank = finishing.nonzero(as_tuple=True)
            rule.finish(fin_group.tolist(), history.index_select(0, source_row[fin_group, fin_rank]).tolist(),
                        top_score[fin_group, fin_rank].tolist(), t)
        # the first continuing candidate of a group is its best (candidates are sorted)
        best_going_on = top_score.masked_fill(~going_on, float("-inf")).max(dim=1).values
        going_on &= ~rule.done(best_going_on, t)[:, None]

        live_group, live_rank = going_on.nonzero(as_tuple=True)
        if live_group.numel() == 0:
            break
        rows = source_row[live_group, live_rank]
        history = torch.cat((history.index_select(0, rows), top_word[live_group, live_rank][:, None]), dim=1)
        row_score = top_score[live_group, live_rank]
        if t == steps - 1:
            rule.out_of_steps(live_group.tolist(), history.tolist(), row_score.tolist(), t + 1)
            break
        row_group = live_group
        last = top_word[live_group, live_rank]
        rows_per_group = torch.bincount(live_group, minlength=num_groups)
        width = int(rows_per_group.max())
        state = decoder.reorder_state(state, rows)
    results = []
    for g, direction in enumerate(directions):
        results.append([Hypothesis(tokens=seq[::-1] if direction == "r2l" else list(seq), score=score,
                                   search_score=score, direction=direction, finished=finished)
                        for seq, score, finished in rule.hypotheses(g)])
    return results
