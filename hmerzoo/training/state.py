"""Trainer state: where a run stands (:class:`TrainState`), and saving / restoring all of it so resume is exact.

A checkpoint holds the model, optimizer, scheduler, the step, the epoch, the number of buckets already trained on in
that epoch (the sampler skips them) and every random generator's state, so N steps straight and N/2 + resume + N/2
give the same losses and weights.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..builder import load_state_dict_checked
from ..checkpoint import (Checkpoint, capture_rng_state, latest_checkpoint, list_checkpoints, load_trainer_state,
                          load_weights, resolve_checkpoint, restore_rng_state, save_checkpoint)
from ..errors import CheckpointError, HmerzooError

TRAINER_STATE_FORMAT = 1


@dataclasses.dataclass
class TrainState:
    """Where training stands; all of it goes into the checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the current epoch, 0-based
    position: int = 0  # buckets of the current epoch already trained on
    best_value: float | None = None  # best train.monitor value so far
    best_step: int | None = None
    # sums since the last metrics line (kept in checkpoints so a resumed run logs the same averages)
    window: dict[str, Any] = dataclasses.field(default_factory=lambda: new_window())
    nonfinite_skipped: int = 0  # batches skipped for a non-finite loss (train.nonfinite=skip)


def new_window() -> dict[str, Any]:
    return {"steps": 0, "loss": 0.0, "grad_norm": 0.0, "losses": {}}


class CheckpointingMixin:
    """Saving and restoring the trainer state; mixed into the loop's :class:`~hmerzoo.training.loop.Trainer`, whose
    setup provides the attributes used here (state, cfg, model, ema, optimizer, scheduler, scaler, dist, run_dir,
    steps_per_epoch, buckets_per_epoch, pending_rng, last_saved_step)."""

    def trainer_state(self, rng: dict, rng_ranks: list[dict] | None = None) -> dict[str, Any]:
        """``rng``: this process's generator states; ``rng_ranks``: every rank's (several processes), in rank order.
        """
        s = self.state
        return {
            "format": TRAINER_STATE_FORMAT,
            "step": s.step, "epoch": s.epoch, "position": s.position,
            "steps_per_epoch": self.steps_per_epoch,  # optimizer steps
            "buckets_per_epoch": self.buckets_per_epoch, "accumulate": self.cfg.accumulate,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "best": {"monitor": self.cfg.monitor, "value": s.best_value, "step": s.best_step},
            "window": s.window,
            "nonfinite_skipped": s.nonfinite_skipped,
            "rng": rng,
            "world_size": self.dist.world_size,
            **({"rng_ranks": rng_ranks} if rng_ranks is not None else {}),
            # train.ema_decay: the weights file holds the EMA weights (once started), this the raw ones
            **({"ema": {"n_averaged": int(self.ema.n_averaged),
                        "raw_model": {k: v.detach() for k, v in self.model.state_dict().items()}}}
               if self.ema is not None else {}),
        }

    def weights_model(self) -> nn.Module:
        """The model that is validated and saved in the .safetensors files: the EMA copy once it has had its first
        update (train.ema_decay), else the trained model itself."""
        if self.ema is not None and int(self.ema.n_averaged) > 0:
            return self.ema.module
        return self.model

    def save(self, rng: dict | None = None) -> Checkpoint | None:
        """Checkpoint the current state. ``rng``: the generator states to store, when they must be those of an
        earlier moment than now (an interrupted validation).

        Several processes: every rank calls this at the same step; the generator states of all ranks are gathered
        and rank 0 writes the files (the weights are the same on every rank). Other ranks return None.
        """
        rng = rng if rng is not None else capture_rng_state()
        rng_ranks = self.dist.all_gather(rng) if self.dist.enabled else None
        ckpt = None
        if self.dist.is_main:
            ckpt = save_checkpoint(self.run_dir, self.state.step, self.weights_model().state_dict(),
                                   self.trainer_state(rng, rng_ranks), keep_last=self.cfg.keep_last)
        self.last_saved_step = self.state.step
        return ckpt

    def restore(self, ckpt: Checkpoint) -> None:
        weights = load_weights(ckpt.weights)
        load_state_dict_checked(self.model, weights, str(ckpt.weights))
        saved = load_trainer_state(ckpt.trainer_state)
        if saved.get("format") != TRAINER_STATE_FORMAT:
            raise CheckpointError(f"{ckpt.trainer_state}: trainer state format {saved.get('format')!r}, this version "
                                  f"reads {TRAINER_STATE_FORMAT}")
        saved_world = int(saved.get("world_size", 1))
        if saved_world != self.dist.world_size:
            raise CheckpointError(f"{ckpt.trainer_state}: saved by a run of {saved_world} process(es), this run has "
                                  f"{self.dist.world_size}; resume with the same number of processes (each one "
                                  "trains its own shard of every epoch's buckets)")
        saved_buckets = saved.get("buckets_per_epoch", saved["steps_per_epoch"])  # the same before train.accumulate
        if saved_buckets != self.buckets_per_epoch:
            raise CheckpointError(f"{ckpt.trainer_state}: saved with {saved_buckets} buckets per epoch, "
                                  f"but the data now gives {self.buckets_per_epoch}; resuming needs the same data "
                                  "section (data.root, limits, batch_size, max_pixels)")
        try:
            self.optimizer.load_state_dict(saved["optimizer"])
            if self.scheduler is not None and saved["scheduler"] is not None:
                self.scheduler.load_state_dict(saved["scheduler"])
            if self.scaler is not None and saved["grad_scaler"] is not None:
                self.scaler.load_state_dict(saved["grad_scaler"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{ckpt.trainer_state}: does not fit this recipe's optimizer/scheduler ({e}); "
                                  "resume with the recipe the run was started with") from None
        self.restore_ema(saved.get("ema"), weights, ckpt)
        best = saved["best"]
        if best.get("monitor") != self.cfg.monitor:
            best = {"value": None, "step": None}  # a new monitor starts a new best
        self.state = TrainState(step=saved["step"], epoch=saved["epoch"], position=saved["position"],
                                best_value=best["value"], best_step=best["step"], window=saved["window"],
                                nonfinite_skipped=int(saved.get("nonfinite_skipped", 0)))
        self.last_saved_step = saved["step"]
        # Several processes: each rank continues its own generator streams (rank 0's are also under "rng").
        self.pending_rng = saved["rng_ranks"][self.dist.rank] if saved.get("rng_ranks") else saved["rng"]
        if self.state.position == 0:
            # Saved at an epoch boundary: the straight run's next move is to start the epoch, so restore now.
            self.restore_pending_rng()

    def restore_ema(self, saved: Mapping[str, Any] | None, weights: Mapping[str, torch.Tensor],
                    ckpt: Checkpoint) -> None:
        """A checkpoint of a run with train.ema_decay: its weights file holds the EMA weights once the EMA has
        started (``n_averaged`` > 0), its trainer state the raw ones, which training continues from (also when the
        EMA is now switched off). A checkpoint without EMA: the raw weights are already loaded, and an EMA switched
        on now starts afresh (its first update copies the weights)."""
        if saved is None:
            return
        load_state_dict_checked(self.model, saved["raw_model"], f"{ckpt.trainer_state} (raw weights)")
        if self.ema is not None:
            n_averaged = int(saved["n_averaged"])
            if n_averaged > 0:
                load_state_dict_checked(self.ema.module, weights, str(ckpt.weights))
            self.ema.n_averaged.fill_(n_averaged)

    def restore_pending_rng(self) -> None:
        if self.pending_rng is not None:
            restore_rng_state(self.pending_rng)
            self.pending_rng = None


def checkpoint_to_resume(run_dir: Path, resume: str | os.PathLike | None, console: Any) -> Checkpoint | None:
    """The checkpoint ``resume`` names (None: a fresh run, which must not overwrite an existing one)."""
    if resume is None:
        if list_checkpoints(run_dir):
            raise HmerzooError(f"{run_dir} already holds checkpoints of a run; continue it with --resume auto "
                               "(resume='auto'), or start a new one elsewhere (train.run_dir=DIR or another "
                               "recipe name)")
        return None
    if str(resume) == "auto":
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            console.print(f"resume=auto: no checkpoint in {run_dir}; starting a fresh run", markup=False,
                          highlight=False, soft_wrap=True)
        return ckpt
    return resolve_checkpoint(resume)
