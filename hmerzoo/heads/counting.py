"""CAN's auxiliary task: count each symbol class in the image (Li et al., ECCV 2022).

Official ``counting_utils.gen_counting_label`` and ``models/can.py``:

- the target of a caption is, per vocabulary id, how often that token occurs in it; the start/stop tokens and the
  structural tokens ``{ } ^ _`` (ids 0, 1, 107-110 of CAN's ``words_dict.txt``) count as nothing, since no
  glyph of the image shows them. hmerzoo names them by token, not by id, so any vocabulary works;
- the loss is ``SmoothL1(c1, y) + SmoothL1(c2, y) + SmoothL1((c1 + c2) / 2, y)`` (mean over batch and classes),
  one term per counting branch plus one for their mean, each of weight 1 (``weight`` scales the sum).

The counts come from the decoder's ``extras["counting"]`` (the list of branch counts [B,V]): CAN's decoder
(``decoders/can.py``) holds the counting module because its output layer reads the counts.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..batch import Batch
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
    """Smooth-L1 counting loss on the decoder's counting branches (``output.extras["counting"]``).

    ``weight``: scales the summed loss (official: 1). ``ignore_tokens``: tokens never counted, besides the
    vocabulary's pad/sos/eos (default: the structural ``{ } ^ _``); tokens the vocabulary lacks are skipped.
    """

    def __init__(self, vocab: Vocabulary, weight: float = 1.0, ignore_tokens: Sequence[str] | None = None):
        super().__init__()
        self.weight = weight
        self.classes = len(vocab)
        tokens = STRUCTURAL_TOKENS if ignore_tokens is None else tuple(ignore_tokens)
        self.ignore_tokens = list(tokens)
        specials = [i for i in (vocab.pad_id, vocab.sos_id, vocab.eos_id) if i is not None]
        self.ignore_ids = sorted(set(specials) | {vocab.token_to_id[t] for t in tokens if t in vocab})

    def targets(self, tokens: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
        return to_device(counting_targets(tokens, self.classes, self.ignore_ids), device)

    def forward(self, output: DecoderOutput, batch: Batch) -> dict[str, torch.Tensor]:
        branches = output.extras.get("counting")
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
        return f"weight={self.weight}, ignore_tokens={self.ignore_tokens}"
