"""The training API under its historical name: a re-export of :mod:`hmerzoo.training` (the loop, the step, state,
validation, output, stopping, extras) and :mod:`hmerzoo.runtime` (device, precision, seeding)."""
from __future__ import annotations

from .runtime import autocast, resolve_device, resolve_precision, runtime_settings, seed_everything
from .training import (DEFAULT_SEED, METRICS_FILE, StepResult, Trainer, TrainState, build_data, compile_model,
                       compile_targets, greedy_validation, make_ema, train, train_step)

__all__ = ["DEFAULT_SEED", "METRICS_FILE", "StepResult", "TrainState", "Trainer", "autocast", "build_data",
           "compile_model", "compile_targets", "greedy_validation", "make_ema", "resolve_device", "resolve_precision",
           "runtime_settings", "seed_everything", "train", "train_step"]
