"""Optimizers and learning-rate schedulers a recipe can name (``optim.type``, ``sched.type``).

An optimizer entry is called with ``params`` (the model's trainable parameters) plus the recipe's keys.
A scheduler entry is called with the recipe's keys plus what the trainer injects where the constructor takes it:
``optimizer``, ``total_steps`` (optimizer steps of the whole run) and ``steps_per_epoch``.

Every scheduler has an ``interval`` saying when the trainer calls ``step``:

- ``"step"``: after every optimizer step;
- ``"epoch"``: at the end of every epoch;
- ``"validation"``: after every validation, with the validation metrics (``step(metrics)``).

So the trainer drives any scheduler the same way without knowing which one it has. ``state_dict`` holds only
primitives, so it can go into a ``torch.load(weights_only=True)`` checkpoint.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from .errors import HmerzooError
from .registry import OPTIMIZERS, SCHEDULERS

OPTIMIZERS.add("adadelta", torch.optim.Adadelta)
OPTIMIZERS.add("sgd", torch.optim.SGD)
OPTIMIZERS.add("adamw", torch.optim.AdamW)
OPTIMIZERS.add("adam", torch.optim.Adam)

INTERVALS = ("step", "epoch", "validation")


class Scheduler:
    """Base class: the interface the trainer relies on."""

    interval: str = "step"

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        # The learning rate each parameter group starts from. ``initial_lr`` is stored in the group (as torch's
        # schedulers do) so that a scheduler rebuilt on resume scales the original values, not decayed ones.
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]

    def step(self, metrics: Mapping[str, float] | None = None) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def lrs(self) -> list[float]:
        """The current learning rate of each parameter group."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def _set_lrs(self, lrs: list[float]) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr


@SCHEDULERS.register("plateau")
class Plateau(Scheduler):
    """Reduce the learning rate when a validation metric stops improving (torch's ReduceLROnPlateau).

    ``patience`` counts validations, not epochs: BTTR/CoMER validate every 2 epochs with Lightning's
    patience 20 // 2 = 10. ``monitor`` names the validation metric (``val/exprate``, ``val/loss``, ...);
    ``mode`` is ``max`` for rates and ``min`` for losses.

    ``max_reductions``: after that many reductions, the next plateau does not reduce the rate but sets
    ``should_stop``, which the trainer honours by ending the run (ABM: halve up to 10 times, then early stop).
    """

    interval = "validation"

    def __init__(self, optimizer: torch.optim.Optimizer, monitor: str = "val/exprate", mode: str = "max",
                 factor: float = 0.1, patience: int = 10, threshold: float = 1e-4, threshold_mode: str = "rel",
                 cooldown: int = 0, min_lr: float = 0.0, eps: float = 1e-8, max_reductions: int | None = None):
        super().__init__(optimizer)
        if max_reductions is not None and max_reductions < 0:
            raise HmerzooError(f"sched.max_reductions: must be >= 0 or null, got {max_reductions}")
        self.max_reductions = max_reductions
        self.num_reductions = 0
        self.should_stop = False
        if mode not in ("max", "min"):
            raise HmerzooError(f"sched.mode: expected 'max' or 'min', got {mode!r}")
        if threshold_mode not in ("rel", "abs"):
            raise HmerzooError(f"sched.threshold_mode: expected 'rel' or 'abs', got {threshold_mode!r}")
        if not 0.0 < factor < 1.0:
            raise HmerzooError(f"sched.factor: must be in (0, 1), got {factor}")
        self.monitor = monitor
        self.inner = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode=mode, factor=factor, patience=patience, threshold=threshold,
            threshold_mode=threshold_mode, cooldown=cooldown, min_lr=min_lr, eps=eps)

    def step(self, metrics: Mapping[str, float] | None = None) -> None:
        if metrics is None or self.monitor not in metrics:
            known = ", ".join(sorted(metrics or {})) or "(none)"
            raise HmerzooError(f"sched.monitor: the plateau scheduler watches '{self.monitor}', which validation "
                               f"did not report; reported metrics: {known}")
        before = self.lrs
        self.inner.step(float(metrics[self.monitor]))
        if any(after < lr for after, lr in zip(self.lrs, before)):
            if self.max_reductions is not None and self.num_reductions >= self.max_reductions:
                self._set_lrs(before)  # the plateau after the last allowed reduction ends the run instead
                self.should_stop = True
            else:
                self.num_reductions += 1

    @property
    def num_bad_validations(self) -> int:
        return int(self.inner.num_bad_epochs)

    def state_dict(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "inner": self.inner.state_dict(), "num_reductions": self.num_reductions,
                "should_stop": self.should_stop}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.inner.load_state_dict(dict(state["inner"]))
        self.num_reductions = int(state.get("num_reductions", 0))
        self.should_stop = bool(state.get("should_stop", False))


@SCHEDULERS.register("cosine")
class WarmupCosine(Scheduler):
    """Linear warm-up then cosine decay, per optimizer step.

    Optimizer step n (1-based) uses ``base_lr * n / warmup_steps`` while n <= warmup_steps, then
    ``min_lr + (base_lr - min_lr) * (1 + cos(pi * p)) / 2`` with p = (n - warmup_steps) / (total_steps -
    warmup_steps), so the last step of the run uses ``min_lr``. Past ``total_steps`` the rate stays at ``min_lr``.
    ``total_steps`` is injected by the trainer (epochs x steps per epoch, or train.max_steps if smaller).
    """

    interval = "step"

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                 min_lr: float = 0.0):
        super().__init__(optimizer)
        if total_steps < 1:
            raise HmerzooError(f"sched.total_steps: must be >= 1, got {total_steps}")
        if warmup_steps < 0:
            raise HmerzooError(f"sched.warmup_steps: must be >= 0, got {warmup_steps}")
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps
        self.min_lr = min_lr
        self.steps_done = 0
        self._set_lrs(self.lrs_for_step(1))  # the rate of the first optimizer step

    def lrs_for_step(self, n: int) -> list[float]:
        """Learning rates of optimizer step ``n`` (1-based)."""
        if n <= self.warmup_steps:
            return [base * n / self.warmup_steps for base in self.base_lrs]
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (n - self.warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return [self.min_lr + (base - self.min_lr) * cosine for base in self.base_lrs]

    def step(self, metrics: Mapping[str, float] | None = None) -> None:
        self.steps_done += 1
        self._set_lrs(self.lrs_for_step(self.steps_done + 1))

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps_done = int(state["steps_done"])
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self._set_lrs(self.lrs_for_step(self.steps_done + 1))


@SCHEDULERS.register("multistep")
class MultiStep(Scheduler):
    """Multiply the learning rate by ``gamma`` at each milestone, counted in epochs (``interval: epoch``, the
    default) or in optimizer steps (``interval: step``)."""

    def __init__(self, optimizer: torch.optim.Optimizer, milestones: list[int], gamma: float = 0.1,
                 interval: str = "epoch"):
        super().__init__(optimizer)
        if interval not in ("epoch", "step"):
            raise HmerzooError(f"sched.interval: multistep counts 'epoch' or 'step', got {interval!r}")
        self.interval = interval
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma = gamma
        self.count = 0  # epochs or steps done
        self._set_lrs(self._lrs())

    def _lrs(self) -> list[float]:
        passed = sum(1 for m in self.milestones if m <= self.count)
        return [base * self.gamma ** passed for base in self.base_lrs]

    def step(self, metrics: Mapping[str, float] | None = None) -> None:
        self.count += 1
        self._set_lrs(self._lrs())

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.count = int(state["count"])
        self.base_lrs = [float(x) for x in state["base_lrs"]]
        self._set_lrs(self._lrs())
