"""One optimizer step: forward and backward under autocast on each bucket of a gradient-accumulation group,
gradient clipping (the norm is always measured), the non-finite policy and the optimizer step; and the messages for
a step that ran out of memory."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn

from ..batch import Batch
from ..config import DataConfig, make_section
from ..errors import HmerzooError
from ..runtime import autocast


@dataclasses.dataclass
class StepResult:
    loss: float
    losses: dict[str, float]
    grad_norm: float
    lr: float  # the learning rate this step used (first parameter group)
    skipped: str | None = None  # train.nonfinite=skip: why the weights were left unchanged (else None)


def train_step(model: nn.Module, batch: Batch | Sequence[Batch], optimizer: torch.optim.Optimizer,
               params: list[nn.Parameter], device: torch.device, precision: str, grad_clip: float | None = None,
               scaler: torch.amp.GradScaler | None = None, step: int = 0, nonfinite: str = "error") -> StepResult:
    """Forward and backward on each batch of one optimizer step, gradient clipping and the optimizer step.

    ``batch``: one batch, or the k batches of a gradient-accumulation group (train.accumulate). Each batch's loss
    is scaled by 1/k before its backward pass, so the gradient is the mean of the k batches' gradients and the
    result's losses are the means of theirs (each batch's own loss being the model's mean over that batch). A model
    with ``no_sync`` (DistributedDataParallel) synchronises the gradients on the last batch's backward only. Batches
    are moved to ``device`` here (no copy for batches already there), one at a time.

    ``step`` (1-based) only appears in error messages. A non-finite loss, or a non-finite gradient norm without
    fp16 loss scaling (which skips such steps on its own), raises before the optimizer changes any weight; with
    ``nonfinite="skip"`` the optimizer is not stepped and the result's ``skipped`` says why.
    """
    group = [batch] if isinstance(batch, Batch) else list(batch)
    k = len(group)
    if k == 0:
        raise ValueError("train_step: no batch to train on")
    optimizer.zero_grad(set_to_none=True)
    losses: list[torch.Tensor] = []
    named_keys: list[str] = []
    named_tensors: list[torch.Tensor] = []
    for i, part in enumerate(group):
        last = i == k - 1
        sync = model.no_sync() if not last and hasattr(model, "no_sync") else contextlib.nullcontext()
        with sync:
            with autocast(device, precision):
                out = model(part.to(device, non_blocking=True))
            loss = out["loss"]
            scaled = loss / k if k > 1 else loss
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        losses.append(loss.detach().float())
        for name, value in (out.get("losses") or {}).items():
            named_keys.append(name)
            named_tensors.append(value.detach().float().reshape(()))
        del out, loss, scaled  # the next batch's forward needs the memory
    if scaler is not None:
        scaler.unscale_(optimizer)  # clip and log the true gradient norm, not the scaled one
    # With no clipping, max_norm=inf still returns the total norm; multiplying by 1.0 is cheap and exact.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else math.inf)
    # One transfer to the host per step, not one per number.
    values = torch.stack([*losses, grad_norm.detach().float().to(losses[0].device, non_blocking=True), *named_tensors]).tolist()
    batch_losses, norm_value = values[:k], values[k]
    loss_value = batch_losses[0] if k == 1 else sum(batch_losses) / k
    named: dict[str, float] = {}
    for name, value in zip(named_keys, values[k + 1:]):
        named[name] = named.get(name, 0.0) + value
    if k > 1:
        named = {name: value / k for name, value in named.items()}
    if not math.isfinite(loss_value) or (scaler is None and not math.isfinite(norm_value)):
        if not math.isfinite(loss_value):
            what = f"loss is {loss_value}"
            culprits = [part for part, value in zip(group, batch_losses) if not math.isfinite(value)]
        else:
            what, culprits = f"gradient norm is {norm_value}", group
        names = ", ".join(sample_names(part) for part in culprits)
        lr = float(optimizer.param_groups[0]["lr"])
        if nonfinite == "skip":
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.update()  # unscale_ found the non-finite gradients: lower the scale as usual
            return StepResult(loss=loss_value, losses=named, grad_norm=norm_value, lr=lr,
                              skipped=f"step {step}: the {what} on the batch of samples: {names}")
        raise HmerzooError(f"step {step}: the {what} (not finite) on the batch of samples: {names}. Lower optim.lr, "
                           "set train.grad_clip, or check these samples (train.nonfinite=skip skips and counts "
                           "such batches instead)")
    lr = float(optimizer.param_groups[0]["lr"])
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepResult(loss=loss_value, losses=named, grad_norm=norm_value, lr=lr)


def sample_names(batch: Batch) -> str:
    return ", ".join(batch.names) if batch.names else f"{len(batch)} unnamed samples"


def is_out_of_memory(error: BaseException) -> bool:
    """A CUDA out-of-memory error, or a failed CPU allocation (``DefaultCPUAllocator: can't allocate memory``)."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", ())
    if isinstance(error, (MemoryError, oom_type)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def out_of_memory_error(batch: Batch, step: int, device: torch.device, recipe: Mapping[str, Any]) -> HmerzooError:
    """The message for a batch that did not fit in memory: its samples and size, and the settings to lower."""
    data = make_section(DataConfig, recipe.get("data"))
    n, height, width = len(batch), batch.images.shape[-2], batch.images.shape[-1]
    names = ", ".join(batch.names) if batch.names else f"{n} unnamed samples"
    return HmerzooError(
        f"step {step}: out of memory on {device} for a batch of {n} images padded to {height}x{width} "
        f"({n * height * width:,} pixels): {names}. Lower data.max_pixels (pixels per batch, now {data.max_pixels}) "
        f"or data.batch_size (now {data.batch_size}); data.max_image_pixels (now {data.max_image_pixels}) drops the "
        "largest images from training")
