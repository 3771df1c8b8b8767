"""Images in, LaTeX out: the body of :meth:`hmerzoo.model.HMERModel.recognize`.

Batching (``decode.batching``):

- ``per_image`` (default): every image is encoded alone and unpadded, since padding changes a convolutional
  encoder's output, so an image's result never depends on the other images of the call. The search is still
  batched: the memories of up to ``batch_size`` images are padded to a common size with the padding masked, which
  a ``memory_padding_invariant`` decoder (cross-attention masked, nothing else reading the memory) decodes exactly
  as each memory alone (up to float rounding, ~1e-6: the same sums in another order). Images are grouped by memory
  size so that padding wastes at most a quarter of a search's work (:func:`size_groups`): a step costs per
  hypothesis in proportion to its padded memory. Other decoders decode each image alone.
- ``padded``: images are padded into batches of ``batch_size`` (in the given order) and encoded together, as the
  official CoMER evaluation did; faster, but a result depends on the batch it lands in.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ..batch import pad_images
from ..config import DecodeConfig
from ..data import images as image_io
from .modes import SearchResult, mode_function, search

# padded memory positions a shared search may waste, as a fraction of the real ones (see size_groups)
PADDING_SLACK = 1.25


def decode_config(recipe: dict | None, **overrides: Any) -> DecodeConfig:
    """The recipe's ``decode:`` section over DecodeConfig's defaults, then every override that is not None."""
    values = dict((recipe or {}).get("decode") or {})
    values.update({k: v for k, v in overrides.items() if v is not None})
    config = DecodeConfig(**values)  # checks its own values (a SectionError, also a ValueError)
    mode_function(config.mode)  # unknown modes fail before any image is read
    return config


def image_tensors(images: Sequence[Any], recipe: dict | None) -> list[torch.Tensor]:
    """Each image -> [1,h,w] float32 in [0,1], white ink on black, through ``prepare_image`` (polarity and size
    normalisation for user photos; CROHME images come back from it unchanged)."""
    ranges = image_io.size_ranges_for_recipe(recipe)
    return [image_io.prepare_image(img, **ranges) for img in images]


def pad_memories(memories: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Memories [1,*spatial,d] of different sizes -> [B,*spatial_max,d] zero-padded at the end of every spatial
    axis, and masks [B,*spatial_max] with True on the padding (plus wherever the image's own mask was True)."""
    spatial = [max(int(m.shape[axis]) for m in memories) for axis in range(1, memories[0].dim() - 1)]
    out = memories[0].new_zeros(len(memories), *spatial, memories[0].shape[-1])
    out_mask = torch.ones(len(memories), *spatial, dtype=torch.bool, device=memories[0].device)
    for i, (memory, mask) in enumerate(zip(memories, masks)):
        region = (i, *(slice(0, int(s)) for s in memory.shape[1:-1]))
        out[region] = memory[0]
        out_mask[region] = mask[0].bool()
    return out, out_mask


@torch.no_grad()
def recognize_tensors(model: Any, tensors: list[torch.Tensor], config: DecodeConfig,
                      stepper: Any = None) -> list[SearchResult]:
    """Search results for images already turned into [1,h,w] tensors, in their order.

    ``stepper``: the incremental interface the search drives (default: the model's decoder), e.g. a
    :class:`~hmerzoo.decoding.prefix.PrefixRecomputingDecoder` for benchmarks.
    """
    device = next(model.parameters()).device
    vocab = model.vocab
    results: list[SearchResult | None] = [None] * len(tensors)

    def run(memory: torch.Tensor, mask: torch.Tensor, which: list[int]) -> None:
        found = search(model.decoder, memory, mask, config, sos_id=vocab.sos_id, eos_id=vocab.eos_id,
                       pad_id=vocab.pad_id, stepper=stepper)
        for i, result in zip(which, found):
            results[i] = result

    if config.batching == "padded":
        for start in range(0, len(tensors), config.batch_size):
            which = list(range(start, min(start + config.batch_size, len(tensors))))
            images, image_mask = pad_images([tensors[i] for i in which])
            memory, mask = model.encode(images.to(device, non_blocking=True), image_mask.to(device, non_blocking=True))
            run(memory, mask, which)
        return results  # type: ignore[return-value]

    encoded = []
    for t in tensors:
        images, image_mask = pad_images([t])  # one image: no padding, an all-False mask
        encoded.append(model.encode(images.to(device, non_blocking=True), image_mask.to(device, non_blocking=True)))
    shareable = (stepper or model.decoder).capabilities.memory_padding_invariant and \
        model.decoder.capabilities.memory_padding_invariant
    if not shareable:
        for i, (memory, mask) in enumerate(encoded):
            run(memory, mask, [i])
        return results  # type: ignore[return-value]
    # similar sizes share a search, so the padded memory wastes little; results do not depend on the grouping
    for which in size_groups([tuple(m.shape[1:-1]) for m, _ in encoded], config.batch_size):
        memory, mask = pad_memories([encoded[i][0] for i in which], [encoded[i][1] for i in which])
        run(memory, mask, which)
    return results  # type: ignore[return-value]


def size_groups(sizes: Sequence[tuple[int, ...]], batch_size: int, slack: float = PADDING_SLACK) -> list[list[int]]:
    """Indices of memories (spatial ``sizes``) grouped for shared searches: at most ``batch_size`` each, and the
    padded area of a group (count x the largest extent on every axis) at most ``slack`` times its real area.

    A search step costs per hypothesis in proportion to its (padded) memory, so one large image padding seven
    small ones makes the batch slower than searching each alone; grouping by area alone is not enough (a wide and
    a tall image of the same area pad each other to a square)."""
    order = sorted(range(len(sizes)), key=lambda i: (_area(sizes[i]), sizes[i]), reverse=True)
    groups: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        if current:
            extent = [max(sizes[j][axis] for j in current + [i]) for axis in range(len(sizes[i]))]
            padded = (len(current) + 1) * _area(extent)
            if len(current) == batch_size or padded > slack * (real + _area(sizes[i])):
                groups.append(current)
                current, real = [], 0
        current.append(i)
        real += _area(sizes[i])
    if current:
        groups.append(current)
    return groups


def _area(size: Sequence[int]) -> int:
    out = 1
    for s in size:
        out *= int(s)
    return out
