"""The one training loop, shared by every model and recipe, on CPU or CUDA.

    seed -> device -> model (build_model) -> data -> optimizer -> scheduler               (setup.py)
    for each epoch:
        for each group of train.accumulate buckets: one optimizer step                    (step.py)
        every train.val_every epochs: teacher-forced loss + greedy ExpRate                (validation.py)
            -> scheduler -> best checkpoint                                               (stopping.py, state.py)
        checkpoint (also every train.ckpt_every steps, at the end, on Ctrl-C and when train.max_time runs out)
    metrics.jsonl and progress                                                            (output.py)

The loop knows the model only through the contract ``model(batch)["loss"]`` / ``["losses"]`` and
``model.greedy``, and schedulers only through ``interval`` + ``step``, so it never names a model.

Several processes (torchrun, ``hmerzoo train --nproc-per-node N``; see :mod:`hmerzoo.distributed`): the training
forward/backward goes through DistributedDataParallel, each rank trains its shard of every epoch's buckets, losses,
validation counts and stop decisions (Ctrl-C, train.max_time) are reduced over ranks, and rank 0 logs and writes the
checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

from ..batch import Batch
from ..builder import RECIPE_FILE, VOCAB_FILE
from ..checkpoint import atomic_write_text, capture_rng_state, save_best
from ..config import TrainConfig, make_section
from ..distributed import setup_distributed
from ..errors import HmerzooError
from ..recipe import dump_recipe, load_recipe, validate_recipe
from ..runtime import runtime_settings
from .extras import eager_mode
from .output import METRICS_FILE, MetricsLog, NullMetricsLog, ProgressDisplay
from .setup import TrainerSetup, run_directory
from .state import CheckpointingMixin, checkpoint_to_resume, new_window
from .step import StepResult, is_out_of_memory, out_of_memory_error, train_step
from .stopping import StopRequest, TimeBudget, is_better, until_stopped
from .validation import greedy_validation


class Trainer(TrainerSetup, CheckpointingMixin):
    """One run: what :class:`TrainerSetup` builds, the loop below, and checkpointing (:class:`CheckpointingMixin`);
    :func:`train` is the entry point."""

    def reached_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps

    def scheduler_stopped(self) -> bool:
        """A scheduler may end the run early by setting ``should_stop`` (e.g. plateau with max_reductions)."""
        return bool(getattr(self.scheduler, "should_stop", False))

    def fit(self) -> None:
        cfg, state = self.cfg, self.state
        self.metrics = (MetricsLog(self.run_dir / METRICS_FILE, resume_step=self.last_saved_step)
                        if self.dist.is_main else NullMetricsLog())  # rank 0 logs for the job
        first_step = state.step
        try:
            with ProgressDisplay(self.console, self.total_steps, state.step) as self.progress:
                while state.epoch < cfg.epochs and not self.scheduler_stopped():
                    if self.out_of_time():  # e.g. a long validation used up the budget
                        break
                    if state.position < self.buckets_per_epoch:
                        if self.reached_max_steps():
                            break
                        self.train_epoch()
                        if self.stop.requested:
                            self.stop_now()
                        if self.time_up:
                            break  # checkpointed below; a resume continues from this step (also an epoch's last)
                        if state.position < self.buckets_per_epoch:
                            break  # train.max_steps ended the run mid-epoch
                    self.end_epoch()
                    if self.stop.requested:
                        self.stop_now()
                    if self.scheduler_stopped():
                        self.progress.line(f"early stop after epoch {state.epoch}: the scheduler "
                                           f"(sched.type={self.recipe['sched'].get('type')}) ended the run")
                if cfg.nonfinite == "skip" and state.step > first_step:
                    self.metrics.write({"step": state.step, "epoch": state.epoch,
                                        "nonfinite_skipped": state.nonfinite_skipped})
                if self.last_saved_step != state.step:
                    self.save()  # the end of the run, e.g. train.max_steps mid-epoch
                if self.time_up:
                    self.progress.line(f"stopping at step {state.step}: {self.budget.describe()}; checkpoint saved "
                                       f"in {self.run_dir}; continue with --resume auto")
        finally:
            self.metrics.close()

    def train_epoch(self) -> None:
        state, sampler = self.state, self.data.train_sampler
        sampler.set_epoch(state.epoch)
        sampler.set_start(state.position)
        batches = iter(self.data.train)
        # Resumed mid-epoch: restore the generators after iter(), which may draw a worker seed from the global
        # generator - the straight run drew it at the start of this epoch, before the states were saved.
        self.restore_pending_rng()
        while state.position < self.buckets_per_epoch and not self.stop.requested and not self.time_up:
            # train.accumulate buckets per optimizer step; the epoch's last group takes the buckets left
            expected = min(self.cfg.accumulate, self.buckets_per_epoch - state.position)
            group = self.next_group(batches, expected)
            if len(group) < expected:
                if self.stop.requested:
                    break
                raise HmerzooError(f"data: the training loader stopped after {state.position + len(group)} of "
                                   f"{self.buckets_per_epoch} buckets of epoch {state.epoch}")
            self.train_one_step(group)
            if self.reached_max_steps():
                break

    def next_group(self, batches: Iterator[Batch], size: int) -> list[Batch]:
        """The ``size`` buckets of the next optimizer step, or fewer when the loader ends early. A stop request
        before its first bucket gives none; a group once begun is completed (the step in flight is finished), unless
        a fetch fails after the request (DataLoader workers exit on Ctrl-C): then the group is dropped untrained and
        the checkpoint's position stays before it, so resuming trains it whole."""
        group: list[Batch] = []
        while len(group) < size:
            if self.stop.requested and not group:
                return []
            try:
                group.append(next(batches))
            except StopIteration:
                break
            except Exception:
                if self.stop.requested:
                    return []
                raise
        return group

    def train_one_step(self, batch: Batch | list[Batch]) -> None:
        """One optimizer step on one bucket or a group of them (train.accumulate)."""
        state = self.state
        group = [batch] if isinstance(batch, Batch) else list(batch)
        try:
            result = train_step(self.train_model, group, self.optimizer, self.params, self.device, self.precision,
                                grad_clip=self.cfg.grad_clip, scaler=self.scaler, step=state.step + 1,
                                nonfinite=self.cfg.nonfinite)
        except Exception as e:
            if is_out_of_memory(e):
                # With several buckets per step the failing one is not known: name the largest (the likeliest).
                largest = max(group, key=lambda b: b.images.numel())
                raise out_of_memory_error(largest, state.step + 1, self.device, self.recipe) from e
            raise
        images = sum(len(b) for b in group)
        if self.dist.enabled:
            result, images = self.reduce_step(result, images)  # also agrees on self.time_up
        else:
            self.time_up = self.budget.expired()
        # A skipped batch (train.nonfinite=skip) still counts as a step: the step count, the schedule and resume
        # positions stay those of a run without the skip; only the weights are left unchanged.
        state.step += 1
        state.position += len(group)
        if self.scheduler is not None and self.scheduler.interval == "step":
            self.scheduler.step()
        if self.ema is not None and state.step > self.cfg.ema_start and state.step % self.cfg.ema_every == 0:
            self.ema.update_parameters(self.model)
        self.window_images += images
        window = state.window
        if result.skipped is not None:
            state.nonfinite_skipped += 1
            self.progress.line(f"warning: {result.skipped}; batch skipped (train.nonfinite=skip), "
                               f"{state.nonfinite_skipped} so far")
        else:
            window["steps"] += 1  # the averages of the metrics line are over the batches trained on
            window["loss"] += result.loss
            window["grad_norm"] += result.grad_norm
            for name, value in result.losses.items():
                window["losses"][name] = window["losses"].get(name, 0.0) + value
        self.progress.step(state.step, result.loss, result.lr)
        if state.step % self.cfg.log_every == 0:
            self.log_train(result.lr)
        if (self.cfg.ckpt_every and state.step % self.cfg.ckpt_every == 0
                and state.position < self.buckets_per_epoch):  # the end of an epoch saves after validation
            self.save()

    def out_of_time(self) -> bool:
        """Whether train.max_time has run out, the same answer on every rank (any rank's clock past the budget)."""
        expired = self.budget.expired()
        self.time_up = self.time_up or (self.dist.any(expired) if self.dist.enabled else expired)
        return self.time_up

    def reduce_step(self, result: StepResult, images: int) -> tuple[StepResult, int]:
        """Several processes: one all-reduce per step gives the loss (and named losses) as the mean over ranks, the
        images of the step over all ranks, whether a rank skipped the batch (train.nonfinite=skip; the gradients are
        averaged, so then no rank's weights change), whether a rank got a Ctrl-C (then all stop after this step) and
        whether a rank's clock is past train.max_time (then all save and end after this step).
        The gradient norm is already the same on every rank: DDP averaged the gradients before clipping.
        """
        names = list(result.losses)
        sums = self.dist.all_reduce_sum([result.loss, *(result.losses[k] for k in names), images,
                                         float(result.skipped is not None), float(self.signal_stop.requested),
                                         float(self.budget.expired())])
        world, n = self.dist.world_size, len(names)
        if sums[n + 3] > 0:
            self.stop.requested = True
        if sums[n + 4] > 0:
            self.time_up = True
        skipped = result.skipped
        if skipped is None and sums[n + 2] > 0:
            skipped = (f"step {self.state.step + 1}: a non-finite loss or gradient on {int(sums[n + 2])} of "
                       f"{world} processes")
        reduced = dataclasses.replace(result, loss=sums[0] / world,
                                      losses={k: v / world for k, v in zip(names, sums[1:n + 1])}, skipped=skipped)
        return reduced, int(round(sums[n + 1]))

    def log_train(self, lr: float) -> None:
        state, window = self.state, self.state.window
        n = window["steps"] or math.nan  # nan (null in the file): every batch of the window was skipped
        elapsed = time.perf_counter() - self.window_start
        record = {"step": state.step, "epoch": state.epoch, "loss": window["loss"] / n,
                  **{f"loss/{k}": v / n for k, v in window["losses"].items()},
                  "lr": lr, "grad_norm": window["grad_norm"] / n,
                  "images/s": self.window_images / elapsed if elapsed > 0 else None}
        if self.cfg.nonfinite == "skip":
            record["nonfinite_skipped"] = state.nonfinite_skipped  # batches skipped since the start of the run
        self.metrics.write(record)
        self.progress.line(f"step {state.step}/{self.total_steps} epoch {state.epoch + 1} loss {record['loss']:.4f} "
                           f"lr {lr:.3g} grad {record['grad_norm']:.3g} "
                           f"{record['images/s'] or 0:.1f} img/s ETA {self.progress.eta()}", plain_only=True)
        state.window = new_window()
        self.window_start, self.window_images = time.perf_counter(), 0

    def end_epoch(self) -> None:
        """Validation (when due), epoch-interval scheduler, next epoch, checkpoint."""
        cfg, state = self.cfg, self.state
        self.restore_pending_rng()  # resumed from a stop during this epoch's validation
        rng_before_validation = capture_rng_state()
        if cfg.val_every and self.data.val is not None and (state.epoch + 1) % cfg.val_every == 0:
            results = self.validate()
            if results is None:  # stopped: checkpoint "epoch trained, not validated yet"
                self.save(rng=rng_before_validation)
                self.stop_now()
            self.metrics.write({"step": state.step, "epoch": state.epoch, **results})
            self.progress.line(f"validation epoch {state.epoch + 1} step {state.step}: "
                               + " ".join(f"{k.split('/')[-1] if k.startswith('val/') else k} {v:.4f}"
                                          for k, v in results.items() if not k.endswith("/count"))
                               + f" ({results['val/count']} expressions)")
            if self.scheduler is not None and self.scheduler.interval == "validation":
                self.scheduler.step(results)
            self.update_best(results)
        if self.scheduler is not None and self.scheduler.interval == "epoch":
            self.scheduler.step()
        state.epoch += 1
        state.position = 0
        self.save()

    def validate(self) -> dict[str, float] | None:
        """Validation metrics, or None when a stop was requested meanwhile."""
        task = None
        if self.progress.progress is not None:
            task = self.progress.progress.add_task("validate", total=len(self.data.val), info="")
        advance = (lambda: self.progress.progress.advance(task)) if task is not None else None
        try:
            # Several processes: each rank validates its shard of the buckets (with rank 0's BatchNorm statistics,
            # the ones the checkpoint holds); the sums are all-reduced.
            # train.ema_decay: val/* are the EMA model's (once it has started), val_raw/* the trained weights' when
            # train.ema_val_raw asks for them. train.compile: validation runs eagerly.
            validated = [("val", self.weights_model())]
            if self.cfg.ema_val_raw and validated[0][1] is not self.model:
                validated.append(("val_raw", self.model))
            results = {}
            with eager_mode() if self.cfg.compile else contextlib.nullcontext():
                for prefix, model in validated:
                    if task is not None and results:
                        self.progress.progress.reset(task)
                    self.dist.broadcast_buffers(model)
                    part = greedy_validation(model, until_stopped(iter(self.data.val), self.stop), self.device,
                                    self.precision, self.cfg.val_max_len, on_batch=advance,
                                    reduce=self.dist.all_reduce_sum if self.dist.enabled else None)
                    results.update({prefix + key[len("val"):]: value for key, value in part.items()})
                    if self.stop.requested:
                        break
        finally:
            if task is not None:
                self.progress.progress.remove_task(task)
        if self.dist.enabled:
            # Rank 0's numbers on every rank, bit for bit: the schedulers, the best and early stopping then decide
            # the same everywhere; a Ctrl-C on any rank during validation stops all.
            results = self.dist.broadcast(results)
            if self.dist.any(self.signal_stop.requested):
                self.stop.requested = True
        return None if self.stop.requested else results

    def update_best(self, results: Mapping[str, float]) -> None:
        state, cfg = self.state, self.cfg
        value = float(results[cfg.monitor])
        if is_better(value, state.best_value, cfg.monitor_mode):
            state.best_value, state.best_step = value, state.step
            if self.dist.is_main:
                save_best(self.run_dir, self.weights_model().state_dict(), cfg.monitor, value, state.step,
                          state.epoch)

    def stop_now(self) -> None:
        """After a Ctrl-C: checkpoint (unless this step is saved already) and raise KeyboardInterrupt."""
        if self.last_saved_step != self.state.step:
            self.save()
        self.progress.line(f"interrupted at step {self.state.step}: checkpoint saved in {self.run_dir}; "
                           "continue with --resume auto")
        raise KeyboardInterrupt


def train(recipe: dict | str | os.PathLike, resume: str | os.PathLike | None = None, console: Any = None,
          source: str | None = None) -> Path:
    """Train a recipe; returns the run directory (``hmerzoo.load_model(run_dir)`` loads the result).

    ``resume``: None starts a fresh run; ``"auto"`` continues from the run directory's latest complete checkpoint
    (fresh if there is none); a path continues from that checkpoint (a run directory or a step file).
    ``source``: where a recipe dict came from, for error messages.
    A Ctrl-C saves a checkpoint at the next step boundary and raises KeyboardInterrupt; train.max_time saves one at
    the first step boundary past the budget and returns normally.
    """
    from rich.console import Console

    source = source if source is not None else None if isinstance(recipe, dict) else str(recipe)
    recipe = load_recipe(recipe)
    validate_recipe(recipe, source)  # the one validation of the train path (the model is built without another)
    cfg = make_section(TrainConfig, recipe.get("train"))
    budget = TimeBudget(cfg.max_time_seconds)  # train.max_time counts from the start of this invocation
    console = console if console is not None else Console(highlight=False)
    run_dir = run_directory(recipe, cfg)
    # Started by torchrun (WORLD_SIZE > 1): join the process group. Rank 0 prints, logs and writes the run directory.
    dist_env = setup_distributed(cfg.device)
    if not dist_env.is_main:
        console = Console(file=io.StringIO(), quiet=True)
    try:
        # Rank 0 decides which checkpoint every rank resumes from (the run directory must be on a shared file system).
        ckpt = dist_env.run_on_main(lambda: checkpoint_to_resume(run_dir, resume, console))
    except BaseException:
        dist_env.close()
        raise

    with contextlib.closing(dist_env), runtime_settings(cfg.num_threads, cfg.deterministic), \
            StopRequest(console) as stop:
        trainer = Trainer(recipe, cfg, run_dir, console, stop, dist=dist_env, budget=budget)
        if ckpt is not None:
            # Before writing anything: a checkpoint of another model must not replace the run's recipe/vocabulary.
            trainer.restore(ckpt)
        if dist_env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / RECIPE_FILE, dump_recipe(recipe))
            trainer.model.vocab.save(str(run_dir / VOCAB_FILE))
        if ckpt is not None:
            console.print(f"resuming from {ckpt.trainer_state} (step {trainer.state.step}, epoch "
                          f"{trainer.state.epoch + 1}, bucket {trainer.state.position} of {trainer.buckets_per_epoch})",
                          markup=False, highlight=False, soft_wrap=True)
        data = trainer.data
        console.print(f"run {run_dir}: {trainer.model.num_parameters(trainable_only=True):,} trainable parameters on "
                      f"{trainer.device} ({trainer.precision}); {data.num_train_samples} training and "
                      f"{data.num_val_samples} validation samples; {trainer.steps_per_epoch} steps per epoch"
                      + (f" of {cfg.accumulate} buckets" if cfg.accumulate > 1 else "") + ", "
                      f"{trainer.total_steps} steps in all", markup=False, highlight=False, soft_wrap=True)
        trainer.fit()
        dist_env.barrier()  # every rank is done (and rank 0 has written the last checkpoint)
        console.print(data.report.summary(), markup=False, highlight=False, soft_wrap=True)
        best = f"; best {cfg.monitor} {trainer.state.best_value:.4f} at step {trainer.state.best_step}" \
            if trainer.state.best_value is not None else ""
        skipped = f"; {trainer.state.nonfinite_skipped} batches skipped for a non-finite loss" \
            if cfg.nonfinite == "skip" else ""
        stopped = "; stopped by train.max_time (continue with --resume auto)" if trainer.time_up else ""
        console.print(f"done: step {trainer.state.step}, checkpoints in {run_dir / 'checkpoints'}{best}{skipped}"
                      f"{stopped}",
                      markup=False, highlight=False, soft_wrap=True)
    return run_dir
