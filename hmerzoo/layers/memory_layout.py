"""Where hypothesis rows meet the image memory they read: :class:`RowLayout` and :class:`CrossMemory`.

Beam search keeps many rows (hypotheses) per image. Instead of copying an image's cross-attention keys/values for
every row at every step, the rows' queries are laid out in a [memory rows x width] grid, so each image's
keys/values are read once per step by all of its rows (see ``MultiheadAttention.attend_grouped``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowLayout:
    """Where each hypothesis row sits in a [memory rows x width] grid: its memory row and its slot there."""

    memory_row: torch.Tensor  # [N] long
    slot: torch.Tensor  # [N] long, distinct within a memory row
    width: int  # slots per memory row (the most rows any memory row has)

    @classmethod
    def one_per_memory(cls, num_memory: int, device: torch.device) -> "RowLayout":
        index = torch.arange(num_memory, device=device)
        return cls(memory_row=index, slot=torch.zeros_like(index), width=1)

    @classmethod
    def of(cls, memory_row: torch.Tensor, num_memory: int) -> "RowLayout":
        counts = torch.bincount(memory_row, minlength=num_memory)
        order = torch.argsort(memory_row, stable=True)  # rows of one memory row keep their relative order
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(memory_row)
        slot[order] = torch.arange(memory_row.numel(), device=memory_row.device) - starts[memory_row[order]]
        return cls(memory_row=memory_row, slot=slot, width=max(int(counts.max()), 1) if memory_row.numel() else 1)

    def to_grid(self, rows: torch.Tensor, num_memory: int) -> torch.Tensor:
        """rows [N,...] -> grid [M, width, ...], zeros in the slots no row fills."""
        grid = rows.new_zeros(num_memory, self.width, *rows.shape[1:])
        grid[self.memory_row, self.slot] = rows
        return grid

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """grid [M, width, ...] -> rows [N,...]."""
        return grid[self.memory_row, self.slot]


@dataclass
class CrossMemory:
    """The cross-attention keys/values of the images that the live rows read.

    keys/values: per layer [A,H,S',hd]; mask: [A,1,1,S'] (True = may attend); images: [A], which memory rows of
    the full set these are. Images without live rows are left out, so attention does no work for them; with
    ``compact``, so are memory positions masked for every one of them (a batch of small images padded to a big
    one's size) - only for decoders where nothing but attention reads the memory's positions.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    images: torch.Tensor

    @classmethod
    def select(cls, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor,
               images: torch.Tensor, compact: bool = True) -> "CrossMemory":
        if images.numel() != mask.shape[0] or not bool(torch.equal(images, torch.arange(mask.shape[0],
                                                                                        device=images.device))):
            mask = mask.index_select(0, images)
            keys = [k.index_select(0, images) for k in keys]
            values = [v.index_select(0, images) for v in values]
        if compact:
            used = mask[:, 0, 0, :].any(0)
            if not bool(used.all()):
                positions = used.nonzero().squeeze(1)
                mask = mask.index_select(3, positions)
                keys = [k.index_select(2, positions) for k in keys]
                values = [v.index_select(2, positions) for v in values]
        return cls(keys=keys, values=values, mask=mask, images=images)
