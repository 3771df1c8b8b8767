"""What one training run builds before its first step: seeds, device and precision, the model (its EMA copy,
compiled parts and DDP wrapper), the data, the optimizer, the scheduler and the loss scaler."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from ..builder import build_component, build_model
from ..config import DataConfig, TrainConfig, make_section
from ..distributed import DistEnv, wrap_ddp
from ..errors import HmerzooError
from ..optim import INTERVALS
from ..registry import OPTIMIZERS, SCHEDULERS
from ..runtime import resolve_device, resolve_precision, seed_everything
from ..vocab import Vocabulary
from .extras import compile_model, make_ema
from .init_from import init_from_recipe, install_training_hooks
from .output import MetricsLog, ProgressDisplay
from .state import TrainState
from .stopping import AgreedStop, StopRequest, TimeBudget

DEFAULT_SEED = 7  # BTTR's and CoMER's seed


def run_directory(recipe: Mapping[str, Any], cfg: TrainConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path(cfg.output_dir) / str(recipe.get("name") or "run")


def build_data(recipe: Mapping[str, Any], vocab: Vocabulary, seed: int, rank: int = 0, world_size: int = 1) -> Any:
    """The training/validation DataBundle of the recipe's ``data:`` section."""
    from ..data import build_dataloaders  # imported here: reading data is not needed to build or load models

    return build_dataloaders(make_section(DataConfig, recipe.get("data")), vocab, seed=seed, rank=rank,
                             world_size=world_size)


class TrainerSetup:
    """The parts of a run; :class:`~hmerzoo.training.loop.Trainer` adds the loop and checkpointing. ``budget``:
    the wall-clock budget of this invocation (train.max_time), started by the caller."""

    def __init__(self, recipe: dict, cfg: TrainConfig, run_dir: Path, console: Any, stop: StopRequest,
                 dist: DistEnv | None = None, budget: TimeBudget | None = None):
        self.recipe, self.cfg, self.run_dir, self.console, self.stop = recipe, cfg, run_dir, console, stop
        # Several processes (torchrun): rank, world size and this rank's device; DistEnv() is a single process.
        self.dist = dist if dist is not None else DistEnv()
        # signal_stop: this process's Ctrl-C. With several processes self.stop is the request all ranks agreed on
        # (at each step's all-reduce and after validation), so that every rank stops after the same step.
        self.signal_stop = stop
        if self.dist.enabled:
            self.stop = AgreedStop()
        self.seed = int(recipe["seed"]) if recipe.get("seed") is not None else DEFAULT_SEED
        seed_everything(self.seed)
        self.device = self.dist.device if self.dist.enabled else resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)

        # validate=False: train() validated the recipe once already
        from ..data.check import labels_vocabulary  # roots without a dictionary: the vocabulary of their labels

        # the same initial weights on every rank (same seed)
        self.model = build_model(recipe, validate=False, vocab=labels_vocabulary(recipe)).to(self.device)
        init_from_recipe(self.model, recipe, console if self.dist.is_main else None)  # model.init_from (init_from.py)
        # train.ema_decay: the EMA copy (made before compiling, so it stays a plain eager model)
        self.ema = make_ema(self.model, cfg.ema_decay) if cfg.ema_decay is not None else None
        if cfg.compile:
            compile_model(self.model, cfg.compile_backend)
        # The training forward/backward goes through train_model: DistributedDataParallel with several processes
        # (gradients averaged over ranks), else the model itself. Validation, saving, greedy decoding etc. use
        # self.model (DDP's .module).
        self.train_model = wrap_ddp(self.model, self.dist, cfg.find_unused_parameters)
        if self.dist.enabled:
            # Dropout etc. draw different numbers on each rank: seed + rank (a single process keeps its stream).
            seed_everything(self.seed + self.dist.rank)
        self.data = build_data(recipe, self.model.vocab, self.seed, rank=self.dist.rank,
                               world_size=self.dist.world_size)
        self.data.train_sampler.set_epoch(0)
        self.buckets_per_epoch = len(self.data.train_sampler)
        if self.buckets_per_epoch == 0:
            raise HmerzooError("data: the training split gave no buckets; check data.root and data.train_split")
        # Optimizer steps per epoch: groups of train.accumulate buckets; the epoch's last group may be shorter.
        self.steps_per_epoch = math.ceil(self.buckets_per_epoch / cfg.accumulate)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_component(OPTIMIZERS, recipe["optim"], "optim", {"params": self.params})
        self.scheduler = None
        if recipe.get("sched"):
            self.scheduler = build_component(SCHEDULERS, recipe["sched"], "sched", {
                "optimizer": self.optimizer, "total_steps": self.total_steps,
                "steps_per_epoch": self.steps_per_epoch})
            self._check_scheduler()
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None

        self.state = TrainState()
        # model.freeze / train.unfreeze_at / set_training_step, from the trainer's step (after the optimizer took all)
        install_training_hooks(self.model, recipe, cfg.unfreeze_at, lambda: self.state.step)
        self.pending_rng: dict | None = None  # RNG states of a resumed checkpoint, restored where the run left off
        self.last_saved_step: int | None = None
        self.metrics: MetricsLog | None = None
        self.progress: ProgressDisplay | None = None
        self.window_start = time.perf_counter()
        self.window_images = 0
        self.budget = budget if budget is not None else TimeBudget(cfg.max_time_seconds)
        self.time_up = False  # train.max_time ran out (agreed by all ranks): save at this step boundary and end

    def _check_scheduler(self) -> None:
        interval = getattr(self.scheduler, "interval", None)
        if interval not in INTERVALS:
            raise HmerzooError(f"sched.type={self.recipe['sched'].get('type')}: the scheduler must have an "
                               f"'interval' attribute in {INTERVALS}, got {interval!r}")
        if interval == "validation" and (self.cfg.val_every == 0 or self.data.val is None):
            # Not an error: quick runs (train.val_every=0) of a paper recipe are common.
            self.console.print(f"warning: sched.type={self.recipe['sched'].get('type')} steps on validation results, "
                               "but this run never validates (train.val_every=0 or no validation data), so the "
                               "learning rate stays constant", markup=False, highlight=False, soft_wrap=True)
