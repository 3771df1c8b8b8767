"""Typed sections of a recipe that are not components: vocab, data, train, decode.

Each is a dataclass: its fields are the keys a recipe may set, with their types and defaults. Unknown keys and
wrong types are reported by :func:`check_section` with the key path and a did-you-mean. Each section checks its own
value ranges (``problems()``) and refuses to be built with bad ones (:class:`SectionError`, all problems at once), so
the rules live here and nowhere else.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import types
import typing
from typing import Any, Union

from pathlib import Path

from .errors import DataError, RecipeError, did_you_mean

PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # train.precision
NONFINITE_POLICIES = ("error", "skip")  # train.nonfinite
VAL_METRICS = ("val/loss", "val/exprate", "val/le1", "val/le2", "val/le3")  # train.monitor
BATCHING = ("per_image", "padded")  # decode.batching
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


# where a data root is looked for when the recipe sets none (resolve_data_root)
DATA_ENV = "HMERZOO_DATA"  # a data root
HOME_ENV = "HMERZOO_HOME"  # hmerzoo's user folder (default ~/.cache/hmerzoo); datasets/crohme holds fetched data
DICTIONARY_FILE = "dictionary.txt"


def repo_data_root() -> Path:
    """``data/crohme`` of the repository this package was imported from (present in a checkout, absent from
    an installed wheel, which does not carry the data)."""
    return Path(__file__).resolve().parent.parent / "data" / "crohme"


def user_data_root() -> Path:
    """Where ``hmerzoo data fetch crohme`` puts the data: ``$HMERZOO_HOME/datasets/crohme``."""
    home = os.environ.get(HOME_ENV) or os.path.join("~", ".cache", "hmerzoo")
    return Path(home).expanduser() / "datasets" / "crohme"


def _looks_like_data_root(path: Path) -> bool:
    return (path / DICTIONARY_FILE).is_file() or (path / "train.zip").is_file() or (path / "train").is_dir()


def resolve_data_root(root: str | os.PathLike | None = None) -> str:
    """The data root to use: ``root`` (the recipe's ``data.root`` or an override) when given, else
    ``$HMERZOO_DATA``, else the repository's ``data/crohme`` (a checkout), else the user cache
    (``$HMERZOO_HOME/datasets/crohme``, default ``~/.cache/hmerzoo/datasets/crohme``).

    An explicit root or ``$HMERZOO_DATA`` is returned as given (``~`` expanded) for the reader to check, so a typo
    is reported as that path, not silently replaced by a default.
    """
    if root is not None:
        return os.path.expanduser(str(root))
    env = os.environ.get(DATA_ENV)
    if env:
        return os.path.expanduser(env)
    tried = []
    for candidate in (repo_data_root(), user_data_root()):
        if _looks_like_data_root(candidate):
            return str(candidate)
        tried.append(str(candidate))
    raise DataError("no data root: data.root is not set, $HMERZOO_DATA is not set, and no CROHME data was found at "
                    + " or ".join(tried) + "; run `hmerzoo data fetch crohme` to download it, or set "
                    "data.root=DIR (a folder of <split>/ folders or <split>.zip files and dictionary.txt)")


def resolve_dictionary(dictionary: str | os.PathLike | None, root: str | os.PathLike | None) -> str:
    """``vocab.dictionary`` when given, else the resolved data root's ``dictionary.txt``."""
    if dictionary is not None:
        return os.path.expanduser(str(dictionary))
    resolved = resolve_data_root(root)
    if not os.path.exists(resolved):
        raise DataError(f"data root '{resolved}' does not exist (the vocabulary is read from its {DICTIONARY_FILE} "
                        "unless vocab.dictionary is set): set data.root=DIR to the folder with the <split>/ "
                        f"folders or <split>.zip files and {DICTIONARY_FILE}")
    return os.path.join(resolved, DICTIONARY_FILE)


def holdout_size(val_holdout: int | None, num_train: int) -> int:
    """Samples held out of training for validation: ``data.val_holdout`` when set, else min(500, 10% of the
    training split) — 500 on full CROHME (8,835), 6 on a 64-image sample."""
    if val_holdout is not None:
        return val_holdout
    return min(500, num_train // 10)


class SectionError(RecipeError, ValueError):
    """A section built with values out of range. Also a ValueError, the error of a bad constructor argument."""


class Section:
    """Base of the sections: ``problems()`` lists what the types cannot express; building a section with problems
    raises :class:`SectionError` listing them all."""

    def problems(self) -> list[str]:
        return []

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise SectionError(problems)


def _at_least(section: Any, path: str, minimum: int, keys: tuple[str, ...], optional: bool = False) -> list[str]:
    out = []
    for key in keys:
        value = getattr(section, key)
        if value is not None and value < minimum:
            out.append(f"{path}.{key}: must be >= {minimum}{' or null' if optional else ''}, got {value}")
    return out


def _one_of(section: Any, path: str, key: str, choices: tuple[str, ...]) -> list[str]:
    value = getattr(section, key)
    if value in choices:
        return []
    return [f"{path}.{key}: expected one of {', '.join(choices)}, got {value!r}{did_you_mean(value, choices)}"]


def parse_duration(value: Any, key: str = "train.max_time") -> float | None:
    """Seconds of a duration: a number of seconds, or a string such as ``90s``, ``30m``, ``8h``, ``1d``, ``1h30m``
    (a bare number string counts seconds). None stays None. Raises :class:`RecipeError` naming ``key``."""
    if value is None:
        return None
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        if re.fullmatch(r"\d+(\.\d+)?", text):
            seconds = float(text)
        elif text and re.fullmatch(r"(\d+(\.\d+)?[smhd])+", text):
            seconds = sum(float(n) * DURATION_UNITS[u] for n, _, u in re.findall(r"(\d+(\.\d+)?)([smhd])", text))
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise RecipeError(f"{key}: expected a positive duration such as 90s, 30m, 8h, 1h30m or a number of seconds, "
                          f"got {value!r}")
    return seconds


@dataclasses.dataclass
class VocabConfig(Section):
    dictionary: str | None = None  # one token per line; default: <data.root>/dictionary.txt
    specials: list[str] = dataclasses.field(default_factory=lambda: ["<pad>", "<sos>", "<eos>"])  # ids 0, 1, ...
    # which tokens play the roles pad / sos / eos (default <pad>, <sos>, <eos>; a missing pad token means no
    # padding token, as in ABM); e.g. {sos: sos, eos: eos} for ABM's own dictionary, which lists them itself
    roles: dict[str, str] | None = None


@dataclasses.dataclass
class DataConfig(Section):
    # directory with <split>/ folders or <split>.zip files (the BTTR/CoMER layout); None: $HMERZOO_DATA, the
    # repository's data/crohme, then ~/.cache/hmerzoo/datasets/crohme (resolve_data_root)
    root: str | None = None
    train_split: str | int = "train"
    # Validation: None = a seeded held-out slice of the training split (val_holdout samples, removed from
    # training). A split name such as "2014" validates on that test set - the protocol of the BTTR/CoMER/ABM
    # papers, which choose checkpoints and decay the learning rate on the test year.
    val_split: str | int | None = None
    val_holdout: int | None = None  # None: min(500, 10% of the training split) (holdout_size); 0: no validation
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
    # a bucket's padded height and width rounded up to a multiple of this: fewer distinct shapes on a GPU (cuDNN
    # algorithm searches, compiled graphs, allocator fragmentation) for a few % more pixels (docs/benchmarks.md)
    pad_multiple: int = 1
    # layout of data.root: crohme | hme100k | folder | auto (detected from the files; hmerzoo/data/formats.py)
    format: str = "auto"
    # a dataset class by registered name (``hmerzoo list datasets``) or module:Attr, instead of data.format; it takes
    # (root, split, vocab, skip_bad=, report=) and offers CrohmeDataset's interface (samples, sizes, select, ...)
    dataset: str | None = None
    # extra transforms by registered name (``hmerzoo list transforms``), each a name or {type: name, arg: value}:
    # ``augment`` on training images only (called with the bucket's seeded generator), ``transforms`` on training
    # and validation images; both run after the built-in ones above, in the order listed
    augment: list | None = None
    transforms: list | None = None

    def problems(self) -> list[str]:
        return (_at_least(self, "data", 1, ("batch_size", "max_pixels", "max_image_pixels", "max_len", "pad_multiple"))
                + _at_least(self, "data", 0, ("num_workers",))
                + _at_least(self, "data", 0, ("val_holdout",), optional=True)
                + _at_least(self, "data", 1, ("train_limit", "val_limit"), optional=True))


@dataclasses.dataclass
class TrainConfig(Section):
    epochs: int = 300
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs when reached first)
    # wall-clock budget of one invocation (90s, 30m, 8h, 1h30m or seconds): at the first step boundary past it the
    # run saves a checkpoint and ends; --resume auto continues (with a fresh budget)
    max_time: str | float | None = None
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
    # model.freeze's modules are released (trainable again) from this optimizer step on; null: frozen throughout
    unfreeze_at: int | None = None

    @property
    def max_time_seconds(self) -> float | None:
        return parse_duration(self.max_time)

    def problems(self) -> list[str]:
        problems = (_at_least(self, "train", 1, ("epochs", "log_every", "val_max_len", "accumulate", "ema_every"))
                    + _at_least(self, "train", 1, ("max_steps", "ckpt_every", "num_threads", "unfreeze_at"),
                                optional=True)
                    + _at_least(self, "train", 0, ("val_every", "keep_last", "ema_start"))
                    + _one_of(self, "train", "precision", PRECISIONS)
                    + _one_of(self, "train", "monitor", VAL_METRICS)
                    + _one_of(self, "train", "monitor_mode", ("max", "min"))
                    + _one_of(self, "train", "nonfinite", NONFINITE_POLICIES))
        if self.grad_clip is not None and self.grad_clip <= 0:
            problems.append(f"train.grad_clip: must be > 0 or null, got {self.grad_clip}")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"train.ema_decay: must be in [0, 1) or null (no EMA), got {self.ema_decay}")
        try:
            parse_duration(self.max_time)
        except RecipeError as e:
            problems += e.problems
        if self.compile:
            import torch._dynamo  # only when asked: importing the compiler stack takes a moment

            backends = torch._dynamo.list_backends(exclude_tags=())
            if self.compile_backend not in backends:
                problems.append(f"train.compile_backend: expected one of {', '.join(backends)}, got "
                                f"{self.compile_backend!r}")
        return problems


@dataclasses.dataclass
class DecodeConfig(Section):
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

    def problems(self) -> list[str]:
        # decode.mode is checked where the modes are known (decoding.recognize.decode_config)
        return _one_of(self, "decode", "batching", BATCHING) + _at_least(self, "decode", 1,
                                                                        ("beam_size", "max_len", "batch_size"))


# model: keys that are not components; the trainer applies them (training/init_from.py), build_model ignores them
MODEL_OPTIONS = {"init_from": Union[str, None], "init_from_modules": Union[list, None], "freeze": Union[list, None]}

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
    """Problems of one dataclass section: not a mapping, unknown keys, wrong types, then (when the keys and types
    are right) the section's own range checks."""
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
    if not problems:
        try:
            cls(**values)
        except RecipeError as e:
            problems += e.problems
    return problems


def make_section(cls: type, values: dict | None):
    """Build the dataclass from a (checked) mapping."""
    return cls(**(values or {}))
