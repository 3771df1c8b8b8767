"""Typed sections of a recipe that are not components: vocab, data, train, decode.

Each is a dataclass: its fields are the keys a recipe may set, with their types and defaults. Unknown keys and
wrong types are reported by :func:`check_section` with the key path and a did-you-mean.
"""
from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from typing import Any, Union

from .errors import did_you_mean


@dataclasses.dataclass
class VocabConfig:
    dictionary: str | None = None  # one token per line; default: <data.root>/dictionary.txt
    specials: list[str] = dataclasses.field(default_factory=lambda: ["<pad>", "<sos>", "<eos>"])  # ids 0, 1, ...
    # which tokens play the roles pad / sos / eos (default <pad>, <sos>, <eos>; a missing pad token means no
    # padding token, as in ABM); e.g. {sos: sos, eos: eos} for ABM's own dictionary, which lists them itself
    roles: dict[str, str] | None = None


@dataclasses.dataclass
class DataConfig:
    root: str | None = None  # directory with <split>/ folders or <split>.zip files (the BTTR/CoMER layout)
    train_split: str | int = "train"
    # Validation: None = a seeded held-out slice of the training split (val_holdout samples, removed from
    # training). A split name such as "2014" validates on that test set - the protocol of the BTTR/CoMER/ABM
    # papers, which choose checkpoints and decay the learning rate on the test year.
    val_split: str | int | None = None
    val_holdout: int = 500
    val_limit: int | None = None  # validate on at most this many samples (quick runs)
    train_limit: int | None = None  # train on at most this many samples (quick runs)
    batch_size: int = 8  # samples per bucket at most
    max_pixels: int = 320_000  # pixels per bucket: biggest image area x samples <= max_pixels
    max_image_pixels: int = 320_000  # training drops images larger than this
    max_len: int = 200  # training drops captions longer than this
    scale_to_limit: bool = False  # CoMER's ScaleToLimitRange (h in [16, 256], w in [16, 1024])
    scale_aug: bool = False  # CoMER's ScaleAugmentation, k ~ U(0.7, 1.4), training only
    num_workers: int = 2
    skip_bad: bool = False  # skip (and count) bad samples instead of stopping with an error


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 300
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs when reached first)
    device: str = "auto"  # auto (CUDA when available, else CPU) | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    grad_clip: float | None = None  # max gradient norm; the norm is logged either way
    val_every: int = 1  # validate every N epochs (0 = never)
    val_max_len: int = 200  # greedy decoding length cap during validation
    log_every: int = 10  # steps between metrics lines
    ckpt_every: int | None = None  # also checkpoint every N steps (always at the end of an epoch)
    keep_last: int = 3  # step checkpoints kept (the best is kept apart)
    monitor: str = "val/exprate"  # metric that defines the best checkpoint
    monitor_mode: str = "max"  # max | min
    output_dir: str = "runs"  # run directory = <output_dir>/<name>, unless run_dir is set
    run_dir: str | None = None
    num_threads: int | None = None  # torch CPU threads (None: torch's default)
    # torch's deterministic algorithms (and cuDNN's deterministic mode) for the run; restored afterwards
    deterministic: bool = False
    # gradient accumulation: buckets per optimizer step, each bucket's loss scaled by 1/N (the last group of an epoch
    # may be shorter: 1/k for its k buckets). Steps (max_steps, ckpt_every, log_every), schedulers and checkpoints
    # count optimizer steps; checkpoints fall on optimizer-step boundaries only
    accumulate: int = 1
    # EMA of the weights (torch.optim.swa_utils.AveragedModel; null = off): ema = decay * ema + (1 - decay) * weights
    # after each optimizer step s with s > ema_start and s % ema_every == 0 (the first update copies the weights). Float
    # buffers (BatchNorm statistics) are averaged too. Once it has started, the EMA model is the one validated
    # (val/*, best, schedulers) and saved in every .safetensors file (so load_model gets it); the raw weights
    # travel in the trainer state for resuming
    ema_decay: float | None = None
    ema_every: int = 1  # optimizer steps between EMA updates
    ema_start: int = 0  # optimizer steps before the first EMA update (the raw model stands in until then)
    ema_val_raw: bool = False  # also validate the raw weights (logged as val_raw/*; doubles validation time)
    # torch.compile the encoder, the neck and the decoder's submodules (its layers) for the training forward, with
    # dynamic shapes; validation and decoding run eagerly. Compiling takes seconds to minutes per new shape class
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend (aot_eager: no code generation, for quick checks)
    # several processes (torchrun / --nproc-per-node): DDP's find_unused_parameters, for models whose training
    # forward leaves some trainable parameters out (costs a graph walk each step)
    find_unused_parameters: bool = False
    # a non-finite loss (or gradient norm): error = stop with a message naming the step and samples; skip = leave
    # the weights unchanged for that batch, count it (metrics.jsonl "nonfinite_skipped", and the end of the run)
    nonfinite: str = "error"


@dataclasses.dataclass
class DecodeConfig:
    beam_size: int = 10
    max_len: int = 200
    alpha: float = 1.0  # length normalisation: score / len ** alpha
    # l2r | r2l: one direction; bttr: L2R and R2L beams, each hypothesis rescored by the other direction (BTTR);
    # comer: both directions in one batch, own + reverse score (CoMER); abm: ABM's L2R search (cost / length)
    mode: str = "l2r"
    # per_image: every image decoded alone and unpadded, so its result never depends on the other images;
    # padded: images padded into batches as the official CoMER evaluation did (faster; results depend on padding)
    batching: str = "per_image"
    batch_size: int = 8  # images decoded together (eval / predict)


SECTIONS = {"vocab": VocabConfig, "data": DataConfig, "train": TrainConfig, "decode": DecodeConfig}


def type_problem(value: Any, annotation: Any, path: str) -> str | None:
    """A message if ``value`` does not fit ``annotation`` (simple types only; unknown annotations pass)."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return None
    ok = _fits(value, annotation)
    if ok is None or ok:
        return None
    return f"{path}: expected {_type_name(annotation)}, got {type(value).__name__} {value!r}"


def _fits(value: Any, ann: Any) -> bool | None:
    origin = typing.get_origin(ann)
    if origin in (Union, types.UnionType):
        results = [_fits(value, a) for a in typing.get_args(ann)]
        if any(r is True for r in results):
            return True
        return None if any(r is None for r in results) else False
    if ann is type(None):
        return value is None
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if ann is str:
        return isinstance(value, str)
    if ann in (list, tuple) or origin in (list, tuple, typing.Sequence):
        return isinstance(value, (list, tuple))
    if ann is dict or origin is dict:
        return isinstance(value, dict)
    return None  # not a type we check


def _type_name(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(ann))
    if ann is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(ann, "__name__", str(ann))


def check_section(cls: type, values: Any, path: str) -> list[str]:
    """Problems of one dataclass section: not a mapping, unknown keys, wrong types."""
    if values is None:
        return []
    if not isinstance(values, dict):
        return [f"{path}: expected a mapping of keys, got {type(values).__name__}"]
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    problems = []
    for key, val in values.items():
        if key not in names:
            problems.append(f"{path}.{key}: unknown key{did_you_mean(key, names)}; known keys: {', '.join(names)}")
            continue
        p = type_problem(val, hints[key], f"{path}.{key}")
        if p:
            problems.append(p)
    return problems


def make_section(cls: type, values: dict | None):
    """Build the dataclass from a (checked) mapping."""
    return cls(**(values or {}))
