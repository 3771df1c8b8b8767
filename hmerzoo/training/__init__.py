"""Training: :func:`train` runs a recipe. The package reads top-down:

- ``loop``: the loop and the ``train`` entry point;
- ``setup``: what a run builds before its first step;
- ``step``: one optimizer step (accumulation, autocast, clipping, the non-finite policy);
- ``state``: the trainer state, its checkpoints and exact resume;
- ``validation``: greedy validation during training;
- ``output``: metrics.jsonl and progress;
- ``stopping``: Ctrl-C, the ranks' agreed stop, train.max_time, best tracking;
- ``extras``: EMA of the weights, torch.compile.
"""
from __future__ import annotations

from .extras import compile_model, compile_targets, eager_mode, make_ema
from .loop import Trainer, train
from .output import METRICS_FILE, MetricsLog, ProgressDisplay
from .setup import DEFAULT_SEED, build_data, run_directory
from .state import TRAINER_STATE_FORMAT, TrainState
from .step import StepResult, train_step
from .stopping import StopRequest, TimeBudget
from .validation import greedy_validation

__all__ = ["DEFAULT_SEED", "METRICS_FILE", "MetricsLog", "ProgressDisplay", "StepResult", "StopRequest",
           "TRAINER_STATE_FORMAT", "TimeBudget", "TrainState", "Trainer", "build_data", "compile_model",
           "compile_targets", "eager_mode", "greedy_validation", "make_ema", "run_directory", "train", "train_step"]
