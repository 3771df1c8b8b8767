"""CAN's auxiliary task: count each symbol class in the image (Li et al., ECCV 2022).

Official ``counting_utils.gen_counting_label`` and ``models/can.py``:

- the target of a caption is, per vocabulary id, how often that token occurs in it; the start/stop tokens and the
  structural tokens ``{ } ^ _`` (ids 0, 1, 107-110 of CAN's ``words_dict.txt``) count as nothing, since no
  glyph of the image shows them. hmerzoo names them by token, not by id, so any vocabulary works;
- the loss is ``SmoothL1(c1, y) + SmoothL1(c2, y) + SmoothL1((c1 + c2) / 2, y)`` (mean over batch and classes),
  one term per counting branch plus one for their mean, each of weight 1 (``weight`` scales the sum).

Where the counts come from (``counter``):

- ``decoder``: the decoder's ``extras["counting"]`` (the list of branch counts [B,V]). CAN's decoder
  (``decoders/can.py``) holds the counting module because its output layer reads the counts;
- ``own``: the head holds a counting module (:class:`~hmerzoo.layers.multiscale_counting.MultiScaleCounting`) on
  the image memory the model hands to every head (``extras["memory"]``, channels-last [B,h,w,d] after a neck or
  channels-first [B,C,h,w]), so counting is an auxiliary task for any encoder and decoder (CoMER + counting:
  ``recipes/comer_count.yaml``). Its counts then only train the encoder through this loss.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..batch import Batch
from ..layers.multiscale_counting import MultiScaleCounting
from ..registry import HEADS
from ..sequence import DecoderOutput, to_device
from ..vocab import Vocabulary

STRUCTURAL_TOKENS = ("{", "}", "^", "_")


def counting_targets(tokens: Sequence[Sequence[int]], classes: int, ignore_ids: Sequence[int] = ()) -> torch.Tensor:
    """Per-caption symbol counts [B, classes] (float32): entry (b, k) is how often id k occurs in caption b, 0 for
    the ids in ``ignore_ids``."""
    ignore = set(ignore_ids)
    out = torch.zeros(len(tokens), classes, dtype=torch.float32)
    for row, caption in enumerate(tokens):
        for t in caption:
            if t not in ignore:
                out[row, t] += 1
    return out


@HEADS.register("counting")
class CountingHead(nn.Module):
    """Smooth-L1 counting loss on counting branches: the decoder's, or the head's own (see the module docstring).

    ``weight``: scales the summed loss (official: 1). ``ignore_tokens``: tokens never counted, besides the
    vocabulary's pad/sos/eos (default: the structural ``{ } ^ _``); tokens the vocabulary lacks are skipped.
    ``counter``: ``decoder`` | ``own``; with ``own``: ``in_channels`` (the memory's channels; default: the
    decoder's d_model, which a neck's output has), ``kernel_sizes`` (3, 5) and ``channels`` (512) of the module.
    """

    def __init__(self, vocab: Vocabulary, weight: float = 1.0, ignore_tokens: Sequence[str] | None = None,
                 counter: str = "decoder", d_model: int | None = None, in_channels: int | None = None,
                 kernel_sizes: Sequence[int] = (3, 5), channels: int = 512):
        super().__init__()
        if counter not in ("decoder", "own"):
            raise ValueError(f"counting head: counter must be 'decoder' or 'own', got {counter!r}")
        self.weight = weight
        self.counter = counter
        self.counting: MultiScaleCounting | None = None
        if counter == "own":
            in_channels = in_channels or d_model
            if not in_channels:
                raise ValueError("counting head: counter 'own' needs in_channels (the memory's channels)")
            self.counting = MultiScaleCounting(in_channels, len(vocab), kernel_sizes, channels)
        self.classes = len(vocab)
        tokens = STRUCTURAL_TOKENS if ignore_tokens is None else tuple(ignore_tokens)
        self.ignore_tokens = list(tokens)
        specials = [i for i in (vocab.pad_id, vocab.sos_id, vocab.eos_id) if i is not None]
        self.ignore_ids = sorted(set(specials) | {vocab.token_to_id[t] for t in tokens if t in vocab})

    def targets(self, tokens: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
        return to_device(counting_targets(tokens, self.classes, self.ignore_ids), device)

    def own_counts(self, output: DecoderOutput) -> list[torch.Tensor]:
        assert self.counting is not None
        memory, mask = output.extras.get("memory"), output.extras.get("memory_mask")
        if memory is None or memory.dim() != 4:
            raise ValueError("counting head: counter 'own' needs the image memory as a 4-D map "
                             "(DecoderOutput.extras['memory'], [B,h,w,d] or [B,C,h,w])")
        channels = self.counting.branches[0].trans_layer[0].in_channels
        if memory.shape[1] != channels and memory.shape[-1] == channels:
            memory = memory.permute(0, 3, 1, 2)  # a neck's channels-last memory
        if memory.shape[1] != channels:
            raise ValueError(f"counting head: the memory {tuple(memory.shape)} has no axis of {channels} channels; "
                             "set in_channels to its channel count")
        return self.counting(memory, mask)[0]

    def forward(self, output: DecoderOutput, batch: Batch) -> dict[str, torch.Tensor]:
        branches = self.own_counts(output) if self.counting is not None else output.extras.get("counting")
        if not branches:
            raise ValueError("counting head: the decoder returned no counts (DecoderOutput.extras['counting']); it "
                             "needs a decoder with a counting module (can)")
        if branches[0].shape[-1] != self.classes:
            raise ValueError(f"counting head: the decoder counts {branches[0].shape[-1]} classes, the vocabulary "
                             f"has {self.classes}")
        target = self.targets(batch.tokens, branches[0].device)
        mean = torch.stack(list(branches)).mean(0)
        loss = sum(F.smooth_l1_loss(c.float(), target) for c in [*branches, mean])
        return {"counting": self.weight * loss}

    def extra_repr(self) -> str:
        return f"weight={self.weight}, counter={self.counter}, ignore_tokens={self.ignore_tokens}"
