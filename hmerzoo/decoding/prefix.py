"""The official way of decoding, kept for benchmarking: every step re-runs the decoder over the whole prefix.

:class:`PrefixRecomputingDecoder` wraps a decoder behind the same ``init_state`` / ``step`` / ``reorder_state``
interface, but its state is only the images and the token prefixes, and each step is a full teacher-forced pass
(``decoder.prefix_logits``) over every row's prefix with the image memory copied per row, as the official BTTR and
CoMER searches do. The same :func:`~hmerzoo.decoding.beam.beam_search` then runs either way, so the two give the
same hypotheses and differ only in speed. Not for real use: its cost grows with the square of the length.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch


@dataclass
class PrefixState:
    """memory/memory_mask: one row per image (as given to init_state); memory_row [N]: each row's image;
    inputs [N,t]: the tokens fed so far, start token first; direction: as given to init_state."""

    memory: torch.Tensor
    memory_mask: torch.Tensor
    memory_row: torch.Tensor
    inputs: torch.Tensor
    direction: str | list[str]


class PrefixRecomputingDecoder:
    """A decoder's incremental interface, implemented by re-running its prefix each step (benchmark only)."""

    def __init__(self, decoder: Any):
        self.decoder = decoder
        # what the search reads: the wrapped decoder's declarations (the prefix is re-run with its memory layout)
        self.capabilities = decoder.capabilities

    def init_state(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                   direction: str | Sequence[str] = "l2r") -> PrefixState:
        n = memory.shape[0]
        return PrefixState(memory=memory, memory_mask=memory_mask,
                           memory_row=torch.arange(n, device=memory.device),
                           inputs=torch.empty(n, 0, dtype=torch.long, device=memory.device),
                           direction=direction if isinstance(direction, str) else list(direction))

    def step(self, state: PrefixState, last_tokens: torch.Tensor) -> tuple[torch.Tensor, PrefixState]:
        inputs = torch.cat((state.inputs, last_tokens[:, None]), dim=1)
        rows = state.memory_row
        direction = state.direction if isinstance(state.direction, str) else [state.direction[i] for i in rows.tolist()]
        # the official searches repeat the image memory for every hypothesis and decode the whole prefix
        logits = self.decoder.prefix_logits(state.memory.index_select(0, rows), state.memory_mask.index_select(0, rows),
                                            inputs, direction)
        return logits[:, -1], replace(state, inputs=inputs)

    def reorder_state(self, state: PrefixState, index: torch.Tensor) -> PrefixState:
        return replace(state, memory_row=state.memory_row.index_select(0, index),
                       inputs=state.inputs.index_select(0, index))
