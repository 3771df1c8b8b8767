"""ABM's mutual distillation between its L2R and R2L decoder branches (Bian et al., AAAI 2022).

Official ``train.py``::

    new_scores  = scores[1:]   (time-major [T,B,V]) masked by y_mask[1:]          -> rows in (time, sample) order
    new_scores2 = flip(scores2[1:], time) masked by flip(y_reverse_mask[1:], time) -> rows in (time, sample) order
    KL = KLDivLoss(batchmean)(log_softmax(new_scores2 / T), softmax(new_scores / T)) * T * T
    loss += beta * KL                     (T = 4, beta = 0.5, nothing detached: gradients reach both branches)

i.e. one KL(p_L2R || q_R2L) over row pairs, divided by the number of pairs. ``pairing`` chooses the pairs:

- ``official`` (default): exactly the official rows. Within one sample, L2R step t (just read y_t, predicting
  y_{t+1}) meets R2L's step that just read y_t (predicting y_{t-1}), for t = 1..n. The rows of a batch are
  interleaved by time, so when captions have different lengths a row can meet a row of another sample - as in
  the official code, which batches captions of mixed lengths.
- ``target``: within each sample, the two steps that predict the same caption token y_k (k = 1..n).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..batch import Batch
from ..errors import RecipeError
from ..sequence import IGNORE_INDEX, DecoderOutput
from ..registry import HEADS

PAIRINGS = ("official", "target")


@HEADS.register("mutual_distillation")
class MutualDistillation(nn.Module):
    """``weight`` x T^2 x KL(softmax(L2R / T) || softmax(R2L / T)) over paired decoder steps; no parameters.

    ``temperature`` T (official 4), ``weight`` beta (official 0.5; 0 turns it off, as does removing the head).
    Needs a decoder output with both directions' rows (ABM's decoder: B L2R rows, then B R2L rows).
    """

    def __init__(self, weight: float = 0.5, temperature: float = 4.0, pairing: str = "official"):
        super().__init__()
        if temperature <= 0:
            raise RecipeError(f"mutual_distillation head: temperature must be > 0, got {temperature}")
        if pairing not in PAIRINGS:
            raise RecipeError(f"mutual_distillation head: pairing must be one of {', '.join(PAIRINGS)}, "
                              f"got {pairing!r}")
        self.weight = weight
        self.temperature = temperature
        self.pairing = pairing

    def forward(self, output: DecoderOutput, batch: Batch) -> torch.Tensor:
        if self.weight == 0:
            return output.logits.new_zeros(())
        l2r_logits, l2r_valid = _direction_rows(output, "l2r")
        r2l_logits, r2l_valid = _direction_rows(output, "r2l")
        if self.pairing == "official":
            teacher, student = _official_pairs(l2r_logits, l2r_valid, r2l_logits, r2l_valid)
        else:
            teacher, student = _target_pairs(l2r_logits, l2r_valid, r2l_logits)
        if teacher.shape[0] == 0:  # only empty captions: nothing to pair
            return output.logits.new_zeros(())
        t = self.temperature
        kl = F.kl_div(F.log_softmax(student.float() / t, dim=-1), F.softmax(teacher.float() / t, dim=-1),
                      reduction="batchmean")
        return self.weight * kl * t * t


def _direction_rows(output: DecoderOutput, direction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [B,T,V], valid steps [B,T]) of one direction's rows."""
    rows = [i for i, d in enumerate(output.directions) if d == direction]
    if not rows:
        raise RecipeError(f"mutual_distillation head: the decoder output has no {direction} rows (directions: "
                          f"{sorted(set(output.directions)) or 'none'}); it needs a decoder that trains both "
                          "directions, such as abm with directions [l2r, r2l]")
    index = torch.tensor(rows, device=output.logits.device)
    return output.logits.index_select(0, index), output.targets.index_select(0, index) != IGNORE_INDEX


def _official_pairs(l2r: torch.Tensor, l2r_valid: torch.Tensor, r2l: torch.Tensor,
                    r2l_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # time-major, step 0 dropped, R2L flipped in time; boolean indexing keeps (time, sample) order, as the official
    # view(-1) + nonzero does
    teacher = l2r.transpose(0, 1)[1:][l2r_valid.transpose(0, 1)[1:]]
    student = r2l.transpose(0, 1)[1:].flip(0)[r2l_valid.transpose(0, 1)[1:].flip(0)]
    return teacher, student


def _target_pairs(l2r: torch.Tensor, l2r_valid: torch.Tensor, r2l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # a caption of n tokens has n + 1 valid steps; L2R step t and R2L step n-1-t both predict y_{t+1} (t < n)
    lengths = l2r_valid.sum(1) - 1
    steps = torch.arange(l2r.shape[1], device=l2r.device)
    pair = steps[None, :] < lengths[:, None]  # [B,T]: L2R steps with a caption-token target
    mirrored = (lengths[:, None] - 1 - steps[None, :]).clamp_min(0)  # the R2L step predicting the same token
    r2l_aligned = r2l.gather(1, mirrored[:, :, None].expand(-1, -1, r2l.shape[-1]))
    return l2r[pair], r2l_aligned[pair]
