"""The one training loop, shared by every model and recipe, on CPU or CUDA.

    seed -> device -> model (build_model) -> data (build_dataloaders) -> optimizer -> scheduler
    for each epoch:
        for each bucket: forward under autocast -> backward -> clip (norm logged) -> optimizer step -> scheduler
        every train.val_every epochs: teacher-forced loss + greedy ExpRate -> scheduler -> best checkpoint
        checkpoint (also every train.ckpt_every steps, at the end, and on Ctrl-C)

The loop knows the model only through the contract ``model(batch)["loss"]`` / ``["losses"]`` and
``model.greedy``, and schedulers only through ``interval`` + ``step``, so it never names a model.

Resume is exact: a checkpoint holds the model, optimizer, scheduler, the step, the epoch, the number of buckets
already trained on in that epoch (the sampler skips them) and every random generator's state, so N steps straight
and N/2 + resume + N/2 give the same losses and weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn as nn

from .batch import Batch
from .builder import RECIPE_FILE, VOCAB_FILE, build_component, build_model, load_state_dict_checked
from .checkpoint import (Checkpoint, atomic_write_text, capture_rng_state, latest_checkpoint, list_checkpoints,
                         load_trainer_state, load_weights, resolve_checkpoint, restore_rng_state, save_best,
                         save_checkpoint)
from .config import DataConfig, TrainConfig, make_section
from .errors import CheckpointError, HmerzooError, RecipeError
from .metrics import ExpRateMeter
from .optim import INTERVALS
from .recipe import dump_recipe, load_recipe, validate_recipe
from .registry import OPTIMIZERS, SCHEDULERS
from .vocab import Vocabulary

DEFAULT_SEED = 7  # BTTR's and CoMER's seed
METRICS_FILE = "metrics.jsonl"
VAL_METRICS = ("val/loss", "val/exprate", "val/le1", "val/le2", "val/le3")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TRAINER_STATE_FORMAT = 1


# --- setup helpers ------------------------------------------------------------------------------------------------
def check_train_config(cfg: TrainConfig) -> None:
    """Values the dataclass types cannot express; every problem at once."""
    problems = []
    if cfg.epochs < 1:
        problems.append(f"train.epochs: must be >= 1, got {cfg.epochs}")
    if cfg.max_steps is not None and cfg.max_steps < 1:
        problems.append(f"train.max_steps: must be >= 1 or null, got {cfg.max_steps}")
    if cfg.precision not in PRECISIONS:
        problems.append(f"train.precision: expected one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    if cfg.grad_clip is not None and cfg.grad_clip <= 0:
        problems.append(f"train.grad_clip: must be > 0 or null, got {cfg.grad_clip}")
    for key in ("val_every", "keep_last"):
        if getattr(cfg, key) < 0:
            problems.append(f"train.{key}: must be >= 0, got {getattr(cfg, key)}")
    for key in ("log_every", "val_max_len"):
        if getattr(cfg, key) < 1:
            problems.append(f"train.{key}: must be >= 1, got {getattr(cfg, key)}")
    if cfg.ckpt_every is not None and cfg.ckpt_every < 1:
        problems.append(f"train.ckpt_every: must be >= 1 or null, got {cfg.ckpt_every}")
    if cfg.num_threads is not None and cfg.num_threads < 1:
        problems.append(f"train.num_threads: must be >= 1 or null, got {cfg.num_threads}")
    if cfg.monitor not in VAL_METRICS:
        problems.append(f"train.monitor: expected one of {', '.join(VAL_METRICS)}, got {cfg.monitor!r}")
    if cfg.monitor_mode not in ("max", "min"):
        problems.append(f"train.monitor_mode: expected 'max' or 'min', got {cfg.monitor_mode!r}")
    if problems:
        raise RecipeError(problems)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda``/``cuda:N`` must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise HmerzooError(f"train.device={name}: CUDA is not available here (torch {torch.__version__}, built "
                               f"for CUDA {torch.version.cuda or 'none'}, no GPU visible); use train.device=cpu or "
                               "train.device=auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HmerzooError(f"train.device={name}: there are only {torch.cuda.device_count()} CUDA devices")
        return device
    raise HmerzooError(f"train.device: expected auto, cpu, cuda or cuda:N, got {name!r}")


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` -> bf16 autocast on CUDA, fp32 on CPU (where bf16 autocast is slower on most machines)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise HmerzooError("train.precision=fp16: float16 autocast with loss scaling is for CUDA; use fp32 or bf16")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise HmerzooError(f"train.precision=bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                           "use fp16 or fp32")
    return name


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


@contextlib.contextmanager
def runtime_settings(cfg: TrainConfig) -> Iterator[None]:
    """Thread count and deterministic mode for the run; the previous process settings come back afterwards."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_benchmark, cudnn_deterministic = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    if cfg.deterministic:
        # cuBLAS needs this before its first use to be deterministic; harmless when CUDA is absent.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a few CUDA kernels have no deterministic version; training should warn, not stop.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn_benchmark, cudnn_deterministic


def run_directory(recipe: Mapping[str, Any], cfg: TrainConfig) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    return Path(cfg.output_dir) / str(recipe.get("name") or "run")


def build_data(recipe: Mapping[str, Any], vocab: Vocabulary, seed: int, rank: int = 0, world_size: int = 1) -> Any:
    """The training/validation DataBundle of the recipe's ``data:`` section."""
    from .data import build_dataloaders  # imported here: reading data is not needed to build or load models

    return build_dataloaders(make_section(DataConfig, recipe.get("data")), vocab, seed=seed, rank=rank,
                             world_size=world_size)


# --- one optimizer step -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StepResult:
    loss: float
    losses: dict[str, float]
    grad_norm: float
    lr: float  # the learning rate this step used (first parameter group)


def train_step(model: nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
               device: torch.device, precision: str, grad_clip: float | None = None,
               scaler: torch.amp.GradScaler | None = None, step: int = 0) -> StepResult:
    """Forward, backward, gradient clipping and one optimizer step on one batch (already on ``device``).

    ``step`` (1-based) only appears in error messages. A non-finite loss, or a non-finite gradient norm without
    fp16 loss scaling (which skips such steps on its own), raises before the optimizer changes any weight.
    """
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, precision):
        out = model(batch)
    loss = out["loss"]
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)  # clip and log the true gradient norm, not the scaled one
    else:
        loss.backward()
    # With no clipping, max_norm=inf still returns the total norm; multiplying by 1.0 is cheap and exact.
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip is not None else math.inf)
    named = out.get("losses") or {}
    # One transfer to the host per step, not one per number.
    values = torch.stack([loss.detach().float(), grad_norm.detach().float().to(loss.device),
                          *(v.detach().float().reshape(()) for v in named.values())]).tolist()
    loss_value, norm_value, named_values = values[0], values[1], values[2:]
    if not math.isfinite(loss_value) or (scaler is None and not math.isfinite(norm_value)):
        what = f"loss is {loss_value}" if not math.isfinite(loss_value) else f"gradient norm is {norm_value}"
        names = ", ".join(batch.names) if batch.names else f"{len(batch)} unnamed samples"
        raise HmerzooError(f"step {step}: the {what} (not finite) on the batch of samples: {names}. Lower optim.lr, "
                           "set train.grad_clip, or check these samples")
    lr = float(optimizer.param_groups[0]["lr"])
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepResult(loss=loss_value, losses=dict(zip(named, named_values)), grad_norm=norm_value, lr=lr)


# --- validation ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[Batch], device: torch.device, precision: str, max_len: int,
             on_batch: Callable[[], None] | None = None) -> dict[str, float]:
    """Teacher-forced loss (mean over samples of each batch's loss) and greedy ExpRate / ≤1 / ≤2 / ≤3."""
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
    rates = meter.compute()
    return {"val/loss": loss_sum / samples if samples else float("nan"),
            **{f"val/{k}": v for k, v in rates.items()}}


# --- Ctrl-C -------------------------------------------------------------------------------------------------------
class StopRequest:
    """Turns the first Ctrl-C into a request the loop honours at the next step boundary (so the checkpoint it then
    writes holds a consistent state); a second Ctrl-C stops at once."""

    def __init__(self, console: Any):
        self.console = console
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "StopRequest":
        # Signal handlers can only be installed from the main thread; elsewhere Ctrl-C behaves as usual.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.console.print("interrupt: finishing this step, then saving a checkpoint (Ctrl-C again to stop now)",
                           markup=False, highlight=False, soft_wrap=True)

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def until_stopped(iterator: Iterator[Any], stop: StopRequest) -> Iterator[Any]:
    """Items of ``iterator`` until it ends or a stop is requested.

    DataLoader workers exit on Ctrl-C themselves, so after a stop request a failing fetch means "stop", not an
    error.
    """
    while not stop.requested:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception:
            if stop.requested:
                return
            raise
        yield item


# --- output -------------------------------------------------------------------------------------------------------
class MetricsLog:
    """``metrics.jsonl``: one JSON object per line. Resuming drops the lines past the checkpoint's step (written
    after it by the run that died), so the file reads as one continuous run."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        if resume_step is None:
            path.unlink(missing_ok=True)
        elif path.is_file():
            kept = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a crash
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        # Non-finite numbers become null: JSON has no NaN/Infinity.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class ProgressDisplay:
    """A rich progress bar (loss, lr, it/s, ETA) on a terminal; plain lines at each metrics line otherwise."""

    def __init__(self, console: Any, total_steps: int, done_steps: int):
        self.console = console
        self.total = total_steps
        self.live = bool(console.is_terminal)
        self.progress: Any = None
        self.task: Any = None
        self.start_time = time.perf_counter()
        self.start_step = done_steps
        self.done = done_steps

    def __enter__(self) -> "ProgressDisplay":
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                console=self.console, refresh_per_second=4)
            self.progress.start()
            self.task = self.progress.add_task("train", total=self.total, completed=self.done,
                                               info="loss - lr - - it/s")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def steps_per_second(self) -> float:
        elapsed = time.perf_counter() - self.start_time
        return (self.done - self.start_step) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> str:
        rate = self.steps_per_second()
        if rate <= 0:
            return "-"
        seconds = int((self.total - self.done) / rate)
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"

    def step(self, step: int, loss: float, lr: float) -> None:
        self.done = step
        if self.progress is not None:
            self.progress.update(self.task, completed=step,
                                 info=f"loss {loss:.4f} lr {lr:.3g} {self.steps_per_second():.2f} it/s")

    def line(self, text: str, plain_only: bool = False) -> None:
        """Print a line (above the bar on a terminal). ``plain_only``: only without a bar (the bar shows it)."""
        if plain_only and self.live:
            return
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)


# --- the loop -----------------------------------------------------------------------------------------------------
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


def new_window() -> dict[str, Any]:
    return {"steps": 0, "loss": 0.0, "grad_norm": 0.0, "losses": {}}


class Trainer:
    """Holds what one run builds; :func:`train` is the entry point."""

    def __init__(self, recipe: dict, cfg: TrainConfig, run_dir: Path, console: Any, stop: StopRequest):
        self.recipe, self.cfg, self.run_dir, self.console, self.stop = recipe, cfg, run_dir, console, stop
        self.seed = int(recipe["seed"]) if recipe.get("seed") is not None else DEFAULT_SEED
        seed_everything(self.seed)
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)

        self.model = build_model(recipe).to(self.device)
        self.data = build_data(recipe, self.model.vocab, self.seed)
        self.data.train_sampler.set_epoch(0)
        self.steps_per_epoch = len(self.data.train_sampler)
        if self.steps_per_epoch == 0:
            raise HmerzooError("data: the training split gave no buckets; check data.root and data.train_split")
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
        self.pending_rng: dict | None = None  # RNG states of a resumed checkpoint, restored where the run left off
        self.last_saved_step: int | None = None
        self.metrics: MetricsLog | None = None
        self.progress: ProgressDisplay | None = None
        self.window_start = time.perf_counter()
        self.window_images = 0

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

    # --- checkpoints ------------------------------------------------------------------------------------------
    def trainer_state(self, rng: dict) -> dict[str, Any]:
        s = self.state
        return {
            "format": TRAINER_STATE_FORMAT,
            "step": s.step, "epoch": s.epoch, "position": s.position,
            "steps_per_epoch": self.steps_per_epoch,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "best": {"monitor": self.cfg.monitor, "value": s.best_value, "step": s.best_step},
            "window": s.window,
            "rng": rng,
        }

    def save(self, rng: dict | None = None) -> Checkpoint:
        """Checkpoint the current state. ``rng``: the generator states to store, when they must be those of an
        earlier moment than now (an interrupted validation)."""
        ckpt = save_checkpoint(self.run_dir, self.state.step, self.model.state_dict(),
                               self.trainer_state(rng if rng is not None else capture_rng_state()),
                               keep_last=self.cfg.keep_last)
        self.last_saved_step = self.state.step
        return ckpt

    def restore(self, ckpt: Checkpoint) -> None:
        load_state_dict_checked(self.model, load_weights(ckpt.weights), str(ckpt.weights))
        saved = load_trainer_state(ckpt.trainer_state)
        if saved.get("format") != TRAINER_STATE_FORMAT:
            raise CheckpointError(f"{ckpt.trainer_state}: trainer state format {saved.get('format')!r}, this version "
                                  f"reads {TRAINER_STATE_FORMAT}")
        if saved["steps_per_epoch"] != self.steps_per_epoch:
            raise CheckpointError(f"{ckpt.trainer_state}: saved with {saved['steps_per_epoch']} buckets per epoch, "
                                  f"but the data now gives {self.steps_per_epoch}; resuming needs the same data "
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
        best = saved["best"]
        if best.get("monitor") != self.cfg.monitor:
            best = {"value": None, "step": None}  # a new monitor starts a new best
        self.state = TrainState(step=saved["step"], epoch=saved["epoch"], position=saved["position"],
                                best_value=best["value"], best_step=best["step"], window=saved["window"])
        self.last_saved_step = saved["step"]
        self.pending_rng = saved["rng"]
        if self.state.position == 0:
            # Saved at an epoch boundary: the straight run's next move is to start the epoch, so restore now.
            self.restore_pending_rng()

    def restore_pending_rng(self) -> None:
        if self.pending_rng is not None:
            restore_rng_state(self.pending_rng)
            self.pending_rng = None

    # --- the loop ---------------------------------------------------------------------------------------------
    def reached_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.state.step >= self.cfg.max_steps

    def fit(self) -> None:
        cfg, state = self.cfg, self.state
        self.metrics = MetricsLog(self.run_dir / METRICS_FILE, resume_step=self.last_saved_step)
        try:
            with ProgressDisplay(self.console, self.total_steps, state.step) as self.progress:
                while state.epoch < cfg.epochs:
                    if state.position < self.steps_per_epoch:
                        if self.reached_max_steps():
                            break
                        self.train_epoch()
                        if self.stop.requested:
                            self.stop_now()
                        if state.position < self.steps_per_epoch:
                            break  # train.max_steps ended the run mid-epoch
                    self.end_epoch()
                    if self.stop.requested:
                        self.stop_now()
                if self.last_saved_step != state.step:
                    self.save()  # the end of the run, e.g. train.max_steps mid-epoch
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
        for batch in until_stopped(batches, self.stop):
            self.train_one_step(batch)
            if state.position >= self.steps_per_epoch or self.reached_max_steps() or self.stop.requested:
                break
        else:
            if not self.stop.requested and state.position < self.steps_per_epoch:
                raise HmerzooError(f"data: the training loader stopped after {state.position} of "
                                   f"{self.steps_per_epoch} buckets of epoch {state.epoch}")

    def train_one_step(self, batch: Batch) -> None:
        state = self.state
        result = train_step(self.model, batch.to(self.device, non_blocking=True), self.optimizer, self.params,
                            self.device, self.precision, grad_clip=self.cfg.grad_clip, scaler=self.scaler,
                            step=state.step + 1)
        state.step += 1
        state.position += 1
        if self.scheduler is not None and self.scheduler.interval == "step":
            self.scheduler.step()
        self.window_images += len(batch)
        window = state.window
        window["steps"] += 1
        window["loss"] += result.loss
        window["grad_norm"] += result.grad_norm
        for name, value in result.losses.items():
            window["losses"][name] = window["losses"].get(name, 0.0) + value
        self.progress.step(state.step, result.loss, result.lr)
        if state.step % self.cfg.log_every == 0:
            self.log_train(result.lr)
        if (self.cfg.ckpt_every and state.step % self.cfg.ckpt_every == 0
                and state.position < self.steps_per_epoch):  # the end of an epoch saves after validation
            self.save()

    def log_train(self, lr: float) -> None:
        state, window = self.state, self.state.window
        n = max(1, window["steps"])
        elapsed = time.perf_counter() - self.window_start
        record = {"step": state.step, "epoch": state.epoch, "loss": window["loss"] / n,
                  **{f"loss/{k}": v / n for k, v in window["losses"].items()},
                  "lr": lr, "grad_norm": window["grad_norm"] / n,
                  "images/s": self.window_images / elapsed if elapsed > 0 else None}
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
                               + " ".join(f"{k.split('/')[-1]} {v:.4f}" for k, v in results.items()
                                          if k != "val/count") + f" ({results['val/count']} expressions)")
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
            results = evaluate(self.model, until_stopped(iter(self.data.val), self.stop), self.device,
                               self.precision, self.cfg.val_max_len, on_batch=advance)
        finally:
            if task is not None:
                self.progress.progress.remove_task(task)
        return None if self.stop.requested else results

    def update_best(self, results: Mapping[str, float]) -> None:
        state, cfg = self.state, self.cfg
        value = float(results[cfg.monitor])
        if not math.isfinite(value):
            return
        better = (state.best_value is None
                  or (value > state.best_value if cfg.monitor_mode == "max" else value < state.best_value))
        if better:
            state.best_value, state.best_step = value, state.step
            save_best(self.run_dir, self.model.state_dict(), cfg.monitor, value, state.step, state.epoch)

    def stop_now(self) -> None:
        """After a Ctrl-C: checkpoint (unless this step is saved already) and raise KeyboardInterrupt."""
        if self.last_saved_step != self.state.step:
            self.save()
        self.progress.line(f"interrupted at step {self.state.step}: checkpoint saved in {self.run_dir}; "
                           "continue with --resume auto")
        raise KeyboardInterrupt


# --- entry point --------------------------------------------------------------------------------------------------
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


def train(recipe: dict | str | os.PathLike, resume: str | os.PathLike | None = None, console: Any = None) -> Path:
    """Train a recipe; returns the run directory (``hmerzoo.load_model(run_dir)`` loads the result).

    ``resume``: None starts a fresh run; ``"auto"`` continues from the run directory's latest complete checkpoint
    (fresh if there is none); a path continues from that checkpoint (a run directory or a step file).
    A Ctrl-C saves a checkpoint at the next step boundary and raises KeyboardInterrupt.
    """
    from rich.console import Console

    source = None if isinstance(recipe, dict) else str(recipe)
    recipe = load_recipe(recipe)
    validate_recipe(recipe, source)
    cfg = make_section(TrainConfig, recipe.get("train"))
    check_train_config(cfg)
    console = console if console is not None else Console(highlight=False)
    run_dir = run_directory(recipe, cfg)
    ckpt = checkpoint_to_resume(run_dir, resume, console)

    with runtime_settings(cfg), StopRequest(console) as stop:
        trainer = Trainer(recipe, cfg, run_dir, console, stop)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / RECIPE_FILE, dump_recipe(recipe))
        trainer.model.vocab.save(str(run_dir / VOCAB_FILE))
        if ckpt is not None:
            trainer.restore(ckpt)
            console.print(f"resuming from {ckpt.trainer_state} (step {trainer.state.step}, epoch "
                          f"{trainer.state.epoch + 1}, bucket {trainer.state.position} of {trainer.steps_per_epoch})",
                          markup=False, highlight=False, soft_wrap=True)
        data = trainer.data
        console.print(f"run {run_dir}: {trainer.model.num_parameters(trainable_only=True):,} trainable parameters on "
                      f"{trainer.device} ({trainer.precision}); {data.num_train_samples} training and "
                      f"{data.num_val_samples} validation samples; {trainer.steps_per_epoch} steps per epoch, "
                      f"{trainer.total_steps} steps in all", markup=False, highlight=False, soft_wrap=True)
        trainer.fit()
        console.print(data.report.summary(), markup=False, highlight=False, soft_wrap=True)
        best = f"; best {cfg.monitor} {trainer.state.best_value:.4f} at step {trainer.state.best_step}" \
            if trainer.state.best_value is not None else ""
        console.print(f"done: step {trainer.state.step}, checkpoints in {run_dir / 'checkpoints'}{best}",
                      markup=False, highlight=False, soft_wrap=True)
    return run_dir
