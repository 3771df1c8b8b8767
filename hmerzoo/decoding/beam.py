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

from ..layers.memory_layout import host_to_device
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
        index = memory_index.index_select(0, host_to_device(groups, memory.device))
        found = _search(decoder, memory.index_select(0, index), memory_mask.index_select(0, index),
                        [directions[g] for g in groups], sos_id=sos_id, eos_id=eos_id, max_len=max_len,
                        rule=rule(beam_size, len(groups)))
        for g, hyps in zip(groups, found):
            results[g] = hyps
    return results


def _search(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, directions: list[str], *, sos_id: int,
            eos_id: int, max_len: int, rule: FinishingRule) -> list[list[Hypothesis]]:
    """One batch of groups; group g is memory row g.

    The device ranks each group's candidates; the host reads them once per step (one packed tensor) and does the
    bookkeeping - the rule, which rows go on, their tokens - in Python, then queues one copy back with the rows to
    keep. So a step waits for the device once, and the decoder never does (``takes_memory_rows``)."""
    device = memory.device
    num_groups = len(directions)
    ends = [direction_tokens(sos_id, eos_id, d) for d in directions]
    stop = [e for _, e in ends]
    last = host_to_device([s for s, _ in ends], device)
    state = decoder.init_state(memory, memory_mask, directions[0] if len(set(directions)) == 1 else directions)
    hinted = bool(getattr(decoder, "takes_memory_rows", False))

    # rows: live hypotheses, sorted by group, within a group in the order they were ranked. Host mirrors: each
    # row's group and token-tree node; the tree (parent, token) holds every prefix once
    row_group = list(range(num_groups))
    tree = _TokenTree()
    row_node = [0] * num_groups
    row_score = torch.zeros(num_groups, dtype=torch.float32, device=device)
    rows_per_group = [1] * num_groups
    width = 1  # the most rows a group has
    grid_index: torch.Tensor | None = None  # per group and slot, its row (num rows: an empty slot); None: 1 per group
    steps = rule.num_steps(max_len)
    if steps == 0:
        rule.out_of_steps(row_group, [[] for _ in row_group], [0.0] * num_groups, 0)
    for t in range(steps):
        logits, state = decoder.step(state, last)
        vocab_size = logits.shape[-1]
        candidates = F.log_softmax(logits.float(), dim=-1) + row_score[:, None]  # [N,V]
        if grid_index is not None:  # a padded [groups, width] grid of rows; empty slots -inf
            candidates = torch.cat((candidates, candidates.new_full((1, vocab_size), float("-inf"))))
            candidates = candidates.index_select(0, grid_index)
        grid = candidates.reshape(num_groups, width * vocab_size)
        keep = [min(c, n * vocab_size) for c, n in zip(rule.num_candidates(), rows_per_group)]
        k = max(keep)
        top_score, top_pos = grid.topk(k, dim=1)  # sorted, best first
        # the step's one read: every group's ranked scores and positions (float64 holds both exactly)
        packed = torch.cat((top_score.double(), top_pos.double()), dim=1).tolist()

        first_row = 0
        fin_group, fin_tokens, fin_scores, best_going_on, going = [], [], [], [], []
        for g in range(num_groups):
            scores, positions = packed[g][:k], packed[g][k:]
            ranked = []  # (source row, token) per rank; None for a padding cell
            flags: list[bool | None] = []
            for j in range(keep[g]):
                slot, token = divmod(int(positions[j]), vocab_size)
                if slot < rows_per_group[g]:
                    ranked.append((first_row + slot, token))
                    flags.append(token == stop[g])
                else:
                    ranked.append(None)
                    flags.append(None)
            finishing, going_on = rule.select(flags) if keep[g] else ([], [])
            for j in finishing:
                fin_group.append(g)
                fin_tokens.append(tree.tokens(row_node[ranked[j][0]]))
                fin_scores.append(scores[j])
            best_going_on.append(max((scores[j] for j in going_on), default=float("-inf")))
            going.append([(j, ranked[j], scores[j]) for j in going_on])
            first_row += rows_per_group[g]
        if fin_group:
            rule.finish(fin_group, fin_tokens, fin_scores, t)
        done = rule.done(best_going_on, t)

        live_flat, words, rows, new_group, new_node, new_score = [], [], [], [], [], []
        for g in range(num_groups):
            if done[g]:
                continue
            for j, (source, token), score in going[g]:
                live_flat.append(g * k + j)
                words.append(token)
                rows.append(source)
                new_group.append(g)
                new_node.append(tree.add(row_node[source], token))
                new_score.append(score)
        if not rows:
            break
        if t == steps - 1:
            rule.out_of_steps(new_group, [tree.tokens(n) for n in new_node], new_score, t + 1)
            break
        rows_per_group = [0] * num_groups
        for g in new_group:
            rows_per_group[g] += 1
        width = max(rows_per_group)
        layout: list[int] = []
        if width > 1 or len(rows) < num_groups:
            starts, n = [], 0
            for count in rows_per_group:
                starts.append(n)
                n += count
            layout = [starts[g] + i if i < rows_per_group[g] else n for g in range(num_groups) for i in range(width)]
        # the step's one copy to the device: which candidates live on, their tokens, their source rows, the grid
        sent = host_to_device(live_flat + words + rows + layout, device)
        n = len(rows)
        row_score = top_score.flatten().index_select(0, sent[:n])
        last = sent[n:2 * n]
        grid_index = sent[3 * n:] if layout else None
        row_node = new_node
        if hinted:
            state = decoder.reorder_state(state, sent[2 * n:3 * n], memory_rows=new_group)
        else:
            state = decoder.reorder_state(state, sent[2 * n:3 * n])
    results = []
    for g, direction in enumerate(directions):
        results.append([Hypothesis(tokens=seq[::-1] if direction == "r2l" else list(seq), score=score,
                                   search_score=score, direction=direction, finished=finished)
                        for seq, score, finished in rule.hypotheses(g)])
    return results


class _TokenTree:
    """Every decoded prefix once, as (parent node, token); node 0 is the empty prefix."""

    def __init__(self) -> None:
        self.parent = [-1]
        self.token = [-1]

    def add(self, parent: int, token: int) -> int:
        self.parent.append(parent)
        self.token.append(token)
        return len(self.parent) - 1

    def tokens(self, node: int) -> list[int]:
        out = []
        while node > 0:
            out.append(self.token[node])
            node = self.parent[node]
        return out[::-1]
