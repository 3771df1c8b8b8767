"""Where hypothesis rows meet the image memory they read: :class:`RowLayout` and :class:`CrossMemory`.

Beam search keeps many rows (hypotheses) per image. Instead of copying an image's cross-attention keys/values for
every row at every step, the rows' queries are laid out in a [memory rows x width] grid, so each image's
keys/values are read once per step by all of its rows (see ``MultiheadAttention.attend_grouped``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def host_to_device(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """A long tensor of host-known integers on ``device`` without waiting for the device: the copy is queued
    (from pinned memory on CUDA, where a pageable source could make the copy wait for the stream)."""
    out = torch.tensor(list(values), dtype=torch.long)
    if device.type == "cuda":
        out = out.pin_memory()
    return out.to(device, non_blocking=True)


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

    @classmethod
    def of_host(cls, memory_row: Sequence[int], images: Sequence[int], device: torch.device) -> "RowLayout":
        """:meth:`of` for rows whose memory rows the caller knows on the host: row i reads ``memory_row[i]``, one
        of ``images`` (sorted), and sits in the grid at that image's index in ``images``. One queued copy."""
        where = {image: i for i, image in enumerate(images)}
        counts = [0] * len(images)
        index, slot = [], []
        for image in memory_row:
            i = where[image]
            index.append(i)
            slot.append(counts[i])
            counts[i] += 1
        both = host_to_device(index + slot, device)
        n = len(index)
        return cls(memory_row=both[:n], slot=both[n:], width=max(max(counts, default=1), 1))

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
               images: torch.Tensor, compact: bool = True, *, all_images: bool | None = None,
               positions: Sequence[int] | None = None) -> "CrossMemory":
        """``all_images``: whether ``images`` is every memory row in order, when the caller knows it (None: compared
        on the device, a host read). ``positions``: the memory positions to keep, when the caller worked them out
        on the host (replaces ``compact``'s device-side search for them)."""
        if all_images is None:
            all_images = images.numel() == mask.shape[0] and bool(
                torch.equal(images, torch.arange(mask.shape[0], device=images.device)))
        if not all_images:
            mask = mask.index_select(0, images)
            keys = [k.index_select(0, images) for k in keys]
            values = [v.index_select(0, images) for v in values]
        if positions is not None:
            if len(positions) < mask.shape[-1]:
                kept = host_to_device(positions, mask.device)
                mask = mask.index_select(3, kept)
                keys = [k.index_select(2, kept) for k in keys]
                values = [v.index_select(2, kept) for v in values]
        elif compact:
            used = mask[:, 0, 0, :].any(0)
            if not bool(used.all()):
                positions = used.nonzero().squeeze(1)
                mask = mask.index_select(3, positions)
                keys = [k.index_select(2, positions) for k in keys]
                values = [v.index_select(2, positions) for v in values]
        return cls(keys=keys, values=values, mask=mask, images=images)
