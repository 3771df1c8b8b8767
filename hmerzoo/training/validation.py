"""Validation during training: the teacher-forced loss and greedy ExpRate of a model over batches (summed over
ranks when several processes share the work). Beam-search evaluation of a finished model is :mod:`hmerzoo.evaluate`.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn as nn

from ..batch import Batch
from ..metrics import ExpRateMeter
from ..runtime import autocast


@torch.no_grad()
def greedy_validation(model: nn.Module, batches: Iterator[Batch], device: torch.device, precision: str, max_len: int,
             on_batch: Callable[[], None] | None = None,
             reduce: Callable[[list[float]], list[float]] | None = None) -> dict[str, float]:
    """Teacher-forced loss (mean over samples of each batch's loss) and greedy ExpRate / ≤1 / ≤2 / ≤3.

    ``reduce`` (several processes, each with its shard of ``batches``): sums a list of numbers over the processes;
    the loss sum, the sample count and the edit-distance histogram are summed before the rates are computed.
    """
    was_training = model.training
    model.eval()
    meter = ExpRateMeter()
    loss_sum, samples = 0.0, 0
    try:
        for batch in batches:
            batch = batch.to(device, non_blocking=True)
            with autocast(device, precision):
                loss = model(batch)["loss"]
                preds = model.greedy(batch.images, batch.image_mask, max_len=max_len)
            loss_sum += float(loss) * len(batch)
            samples += len(batch)
            meter.update(preds, batch.tokens)
            if on_batch is not None:
                on_batch()
    finally:
        model.train(was_training)
    if reduce is not None:
        totals = reduce([loss_sum, samples, *meter.histogram])
        loss_sum, samples = totals[0], int(round(totals[1]))
        meter.histogram = [int(round(x)) for x in totals[2:]]
    rates = meter.compute()
    return {"val/loss": loss_sum / samples if samples else float("nan"),
            **{f"val/{k}": v for k, v in rates.items()}}
