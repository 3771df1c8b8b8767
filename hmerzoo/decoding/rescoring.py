"""Second passes of the bidirectional modes: every hypothesis scored by the direction that did not find it, in
teacher-forced passes over all hypotheses of all images.

- :func:`rescore_by_opposite_direction`: BTTR's ``_cross_rate_score``, ``score += log p(tokens + stop)``;
- :func:`rate_by_opposite_direction`: CoMER's ``_rate``, ``-sum CE / (#non-pad decoder inputs)**alpha``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..decoders.base import length_chunks
from ..layers.memory_layout import host_to_device
from ..sequence import direction_tokens
from .beam import Hypothesis

OPPOSITE = {"l2r": "r2l", "r2l": "l2r"}


def rescore_by_opposite_direction(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor,
                                  per_image: list[list[Hypothesis]]) -> None:
    """BTTR's ``_cross_rate_score`` for all images at once: ``score += log p`` of each hypothesis under the other
    direction (in place). One teacher-forced pass per direction over every image's hypotheses, each image's memory
    read where the decoder allows it without copies (``log_likelihood``'s ``memory_index``)."""
    for found_by in ("l2r", "r2l"):
        items = [(i, h) for i, hyps in enumerate(per_image) for h in hyps if h.direction == found_by]
        if not items:
            continue
        images = [i for i, _ in items]
        # a decoder that groups rows by image on the host takes the index as a list (no read of the device)
        index = images if getattr(decoder, "takes_memory_rows", False) else host_to_device(images, memory.device)
        rated = decoder.log_likelihood(memory, memory_mask, [h.tokens for _, h in items], OPPOSITE[found_by],
                                       memory_index=index).float().cpu().numpy()
        # float32 sums, as the official adds a float32 tensor to the float32 search score
        totals = np.asarray([h.score for _, h in items], dtype=np.float32) + rated
        for (_, h), total in zip(items, totals.tolist()):
            h.score = total


def rate_by_opposite_direction(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor,
                               tokens: list[list[int]], directions: list[str], *, sos_id: int, eos_id: int,
                               pad_id: int, alpha: float, memory_rows: list[int] | None = None) -> torch.Tensor:
    """The official CoMER ``_rate``: sequence i (reading order) on memory row i (``memory_rows[i]`` when given),
    rated in ``directions[i]``: ``-sum CE / (#non-pad decoder inputs)**alpha``, ``<pad>`` targets ignored.
    [N] float32.

    The official pads all rows to the longest in one pass; ``<pad>`` inputs come after a row's real ones and are
    masked, so rows of similar length are rated together instead (:func:`length_chunks`): one hypothesis cut off
    at ``max_len`` would otherwise make every row of a batch of images cost ``max_len`` steps.
    With ``memory_rows``, a decoder that groups rows per image on the host (``takes_memory_rows``) projects each
    image's keys/values once for all its hypotheses instead of copying the image per hypothesis."""
    scores = torch.empty(len(tokens), dtype=torch.float32, device=memory.device)
    grouped = memory_rows is not None and bool(getattr(decoder, "takes_memory_rows", False))
    for chunk in length_chunks([len(t) for t in tokens]):
        rows = host_to_device(chunk, memory.device)
        if grouped:
            assert memory_rows is not None
            index: list[int] | None = [memory_rows[i] for i in chunk]
            chunk_memory, chunk_mask = memory, memory_mask
        else:
            images = rows if memory_rows is None else host_to_device([memory_rows[i] for i in chunk], memory.device)
            index, chunk_memory, chunk_mask = None, memory.index_select(0, images), memory_mask.index_select(0, images)
        scores[rows] = _rate(decoder, chunk_memory, chunk_mask, [tokens[i] for i in chunk],
                             [directions[i] for i in chunk], sos_id=sos_id, eos_id=eos_id, pad_id=pad_id,
                             alpha=alpha, memory_index=index).float()
    return scores


def _rate(decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor, tokens: list[list[int]],
          directions: list[str], *, sos_id: int, eos_id: int, pad_id: int, alpha: float,
          memory_index: list[int] | None = None) -> torch.Tensor:
    """One padded teacher-forced pass of :func:`rate_by_opposite_direction`; row i reads memory row i, or
    ``memory_index[i]`` (a host list, for ``takes_memory_rows`` decoders)."""
    length = max(len(t) for t in tokens) + 1
    # built on the host and sent in one queued copy (not one blocking copy per row)
    inputs, targets = [], []
    for seq, d in zip(tokens, directions):
        begin, stop = direction_tokens(sos_id, eos_id, d)
        body = list(seq[::-1] if d == "r2l" else seq)
        pad = [pad_id] * (length - 1 - len(body))
        inputs += [begin] + body + pad
        targets += body + [stop] + pad
    both = host_to_device(inputs + targets, memory.device).view(2, len(tokens), length)
    inputs, targets = both[0], both[1]
    mixed = len(set(directions)) > 1
    direction = list(directions) if mixed else directions[0]
    if memory_index is None:
        logits = decoder.prefix_logits(memory, memory_mask, inputs, direction)
    else:
        logits = decoder.prefix_logits(memory, memory_mask, inputs, direction, memory_index=memory_index)
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=pad_id,
                         reduction="none").view(len(tokens), length)
    penalty = (inputs != pad_id).sum(dim=1) ** alpha
    return -ce.sum(dim=1) / penalty
