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
from ..sequence import IGNORE_INDEX, DecoderOutput, to_device
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
        l2r_rows = _direction_rows(output, "l2r")
        r2l_rows = _direction_rows(output, "r2l")
        steps = output.logits.shape[1]
        lengths = _caption_lengths(output, batch, l2r_rows, r2l_rows)
        pairs = _official_pairs if self.pairing == "official" else _target_pairs
        teacher_index, student_index = pairs(l2r_rows, r2l_rows, lengths, steps)
        if not teacher_index:  # only empty captions: nothing to pair
            return output.logits.new_zeros(())
        # the pairs' flat row numbers are known on the host (from the captions): one asynchronous copy and two
        # index_selects pick the same rows, in the same order, as the official boolean masks, without a host sync
        index = to_device(torch.tensor([teacher_index, student_index]), output.logits.device)
        flat = output.logits.reshape(-1, output.logits.shape[-1])
        teacher, student = flat.index_select(0, index[0]), flat.index_select(0, index[1])
        t = self.temperature
        kl = F.kl_div(F.log_softmax(student.float() / t, dim=-1), F.softmax(teacher.float() / t, dim=-1),
                      reduction="batchmean")
        return self.weight * kl * t * t


def _direction_rows(output: DecoderOutput, direction: str) -> list[int]:
    """The rows of the decoder output in one direction (one per sample, in batch order)."""
    rows = [i for i, d in enumerate(output.directions) if d == direction]
    if not rows:
        raise RecipeError(f"mutual_distillation head: the decoder output has no {direction} rows (directions: "
                          f"{sorted(set(output.directions)) or 'none'}); it needs a decoder that trains both "
                          "directions, such as abm with directions [l2r, r2l]")
    return rows


def _caption_lengths(output: DecoderOutput, batch: Batch | None, l2r: list[int], r2l: list[int]) -> list[int]:
    """Caption length n per sample (its rows have n + 1 targeted steps, teacher forcing's targets): from the
    batch's tokens when they match the output (the training path: no host sync), else read from the targets."""
    tokens = getattr(batch, "tokens", None)
    steps = output.logits.shape[1]
    if tokens is not None and len(l2r) == len(r2l) == len(tokens) and steps == max(map(len, tokens), default=0) + 1:
        return [len(t) for t in tokens]
    l2r_index = torch.tensor(l2r, device=output.targets.device)
    return ((output.targets.index_select(0, l2r_index) != IGNORE_INDEX).sum(1) - 1).tolist()


def _official_pairs(l2r: list[int], r2l: list[int], lengths: list[int],
                    steps: int) -> tuple[list[int], list[int]]:
    # time-major, step 0 dropped, R2L flipped in time, valid steps (t <= n) only: the (time, sample) order of the
    # official view(-1) + nonzero. Row r's step t is flat row r * steps + t.
    teacher = [l2r[b] * steps + t for t in range(1, steps) for b, n in enumerate(lengths) if t <= n]
    student = [r2l[b] * steps + t for t in range(steps - 1, 0, -1) for b, n in enumerate(lengths) if t <= n]
    return teacher, student


def _target_pairs(l2r: list[int], r2l: list[int], lengths: list[int], steps: int) -> tuple[list[int], list[int]]:
    # a caption of n tokens: L2R step t and R2L step n-1-t both predict y_{t+1} (t < n); sample-major order
    teacher = [l2r[b] * steps + t for b, n in enumerate(lengths) for t in range(n)]
    student = [r2l[b] * steps + n - 1 - t for b, n in enumerate(lengths) for t in range(n)]
    return teacher, student
