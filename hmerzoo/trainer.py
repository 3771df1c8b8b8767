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

Options (docs/recipes.md): ``train.accumulate`` N buckets per optimizer step (each loss scaled by 1/N; steps,
schedulers, logs and checkpoints count optimizer steps, and checkpoints fall between steps only);
``train.ema_decay`` an EMA copy of the weights (torch's AveragedModel), validated and saved in the weights files
while the trained weights travel in the trainer state; ``train.compile`` torch.compile of the encoder, neck and the
decoder's layers for the training forward; ``train.deterministic`` torch's deterministic algorithms for the run.

Several processes (torchrun, ``hmerzoo train --nproc-per-node N``; see :mod:`hmerzoo.distributed`): the training
forward/backward goes through DistributedDataParallel, each rank trains its shard of every epoch's buckets, losses
and validation counts are reduced over ranks, and rank 0 logs and writes the checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn

from .batch import Batch
from .builder import RECIPE_FILE, VOCAB_FILE, build_component, build_model, load_state_dict_checked
from .checkpoint import (Checkpoint, atomic_write_text, capture_rng_state, latest_checkpoint, list_checkpoints,
                         load_trainer_state, load_weights, resolve_checkpoint, restore_rng_state, save_best,
                         save_checkpoint)
from .config import DataConfig, TrainConfig, make_section
from .distributed import DistEnv, setup_distributed, wrap_ddp
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
NONFINITE_POLICIES = ("error", "skip")  # train.nonfinite
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
    if cfg.nonfinite not in NONFINITE_POLICIES:
        problems.append(f"train.nonfinite: expected one of {', '.join(NONFINITE_POLICIES)}, got {cfg.nonfinite!r}")
    if cfg.accumulate < 1:
        problems.append(f"train.accumulate: must be >= 1, got {cfg.accumulate}")
    if cfg.ema_decay is not None and not 0.0 <= cfg.ema_decay < 1.0:
        problems.append(f"train.ema_decay: must be in [0, 1) or null (no EMA), got {cfg.ema_decay}")
    if cfg.ema_every < 1:
        problems.append(f"train.ema_every: must be >= 1, got {cfg.ema_every}")
    if cfg.ema_start < 0:
        problems.append(f"train.ema_start: must be >= 0, got {cfg.ema_start}")
    if cfg.compile:
        import torch._dynamo  # only when asked: importing the compiler stack takes a moment

        backends = torch._dynamo.list_backends(exclude_tags=())
        if cfg.compile_backend not in backends:
            problems.append(f"train.compile_backend: expected one of {', '.join(backends)}, got "
                            f"{cfg.compile_backend!r}")
    if problems:
        raise RecipeError(problems)


def resolve_device(name: str, setting: str = "train.device") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda``/``cuda:N`` must exist. ``setting`` names the recipe key
    or CLI flag the value came from, for the error message."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise HmerzooError(f"{setting}={name}: CUDA is not available here (torch {torch.__version__}, built "
                               f"for CUDA {torch.version.cuda or 'none'}, no GPU visible); use {setting}=cpu or "
                               f"{setting}=auto")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise HmerzooError(f"{setting}={name}: there are only {torch.cuda.device_count()} CUDA devices")
        return device
    raise HmerzooError(f"{setting}: expected auto, cpu, cuda or cuda:N, got {name!r}")


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
    values = torch.stack([*losses, grad_norm.detach().float().to(losses[0].device), *named_tensors]).tolist()
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


# --- EMA of the weights, torch.compile ----------------------------------------------------------------------------
def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """The EMA copy of ``model`` for train.ema_decay: torch's ``AveragedModel`` with its EMA update
    (``get_ema_multi_avg_fn``). ``use_buffers=True``: the float buffers (BatchNorm running statistics) are averaged
    like the parameters, so they follow the averaged weights; integer buffers (``num_batches_tracked``) get the same
    formula, rounded down. Its first update copies the model (``n_averaged`` 0)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.requires_grad_(False)
    return ema


def compile_targets(model: nn.Module) -> list[nn.Module]:
    """What train.compile compiles: the encoder, the neck, and the decoder's submodules that hold modules of their
    own (e.g. the transformer layers; ModuleLists/Dicts are looked into, plain Linear/Embedding/Dropout are left).

    Not the decoder itself: its teacher-forced ``forward`` takes the captions as Python lists, which the compiler
    would guard on (a recompilation for nearly every batch), and its incremental decoding runs step by step.
    """
    def composite(module: nn.Module) -> Iterator[nn.Module]:
        for child in module.children():
            if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
                yield from composite(child)
            elif next(child.children(), None) is not None:
                yield child

    targets = [m for m in (getattr(model, "encoder", None), getattr(model, "neck", None)) if m is not None]
    decoder = getattr(model, "decoder", None)
    return targets + (list(composite(decoder)) if decoder is not None else [])


def compile_model(model: nn.Module, backend: str = "inductor") -> list[nn.Module]:
    """Compile :func:`compile_targets` in place (``nn.Module.compile``: the state-dict keys stay those of the plain
    model, no ``_orig_mod.``), with dynamic shapes: image sizes, batch sizes and caption lengths vary from bucket to
    bucket. Sizes 0 and 1 are still specialised, so batches of one image or feature maps one cell high/wide compile
    their own graphs (a handful in all). Returns the compiled modules."""
    targets = compile_targets(model)
    for module in targets:
        module.compile(backend=backend, dynamic=True)
    return targets


def eager_mode() -> contextlib.AbstractContextManager:
    """Compiled modules run eagerly inside (validation: greedy decoding would compile graphs for its step shapes)."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


# --- validation ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[Batch], device: torch.device, precision: str, max_len: int,
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


class AgreedStop:
    """Several processes: the stop request as the ranks agreed on it (set by the trainer at each step's all-reduce
    and after validation), so every rank stops after the same step. Reads like a StopRequest."""

    def __init__(self) -> None:
        self.requested = False


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


class NullMetricsLog:
    """What ranks other than 0 log to: nothing (rank 0 writes metrics.jsonl)."""

    def write(self, record: Mapping[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


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
    nonfinite_skipped: int = 0  # batches skipped for a non-finite loss (train.nonfinite=skip)


def new_window() -> dict[str, Any]:
    return {"steps": 0, "loss": 0.0, "grad_norm": 0.0, "losses": {}}


class Trainer:
    """Holds what one run builds; :func:`train` is the entry point."""

    def __init__(self, recipe: dict, cfg: TrainConfig, run_dir: Path, console: Any, stop: StopRequest,
                 dist: DistEnv | None = None):
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

        self.model = build_model(recipe).to(self.device)  # the same initial weights on every rank (same seed)
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

    # --- the loop ---------------------------------------------------------------------------------------------
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
                    if state.position < self.buckets_per_epoch:
                        if self.reached_max_steps():
                            break
                        self.train_epoch()
                        if self.stop.requested:
                            self.stop_now()
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
        while state.position < self.buckets_per_epoch and not self.stop.requested:
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
            result, images = self.reduce_step(result, images)
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

    def reduce_step(self, result: StepResult, images: int) -> tuple[StepResult, int]:
        """Several processes: one all-reduce per step gives the loss (and named losses) as the mean over ranks, the
        images of the step over all ranks, whether a rank skipped the batch (train.nonfinite=skip; the gradients are
        averaged, so then no rank's weights change) and whether a rank got a Ctrl-C (then all stop after this step).
        The gradient norm is already the same on every rank: DDP averaged the gradients before clipping.
        """
        names = list(result.losses)
        sums = self.dist.all_reduce_sum([result.loss, *(result.losses[k] for k in names), images,
                                         float(result.skipped is not None), float(self.signal_stop.requested)])
        world, n = self.dist.world_size, len(names)
        if sums[n + 3] > 0:
            self.stop.requested = True
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
                    part = evaluate(model, until_stopped(iter(self.data.val), self.stop), self.device,
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
        if not math.isfinite(value):
            return
        better = (state.best_value is None
                  or (value > state.best_value if cfg.monitor_mode == "max" else value < state.best_value))
        if better:
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

    with contextlib.closing(dist_env), runtime_settings(cfg), StopRequest(console) as stop:
        trainer = Trainer(recipe, cfg, run_dir, console, stop, dist=dist_env)
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
        console.print(f"done: step {trainer.state.step}, checkpoints in {run_dir / 'checkpoints'}{best}{skipped}",
                      markup=False, highlight=False, soft_wrap=True)
    return run_dir
