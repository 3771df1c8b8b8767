"""Where and how tensors run, for training and inference alike: device and precision resolution, the autocast
context, seeding, and the process-wide torch settings of a run (threads, deterministic mode, float32 matmul
precision)."""
from __future__ import annotations

import contextlib
import os
import random
from typing import Iterator

import numpy as np
import torch

from .config import PRECISIONS
from .errors import HmerzooError

__all__ = ["PRECISIONS", "autocast", "inference_settings", "matmul_precision", "resolve_device", "resolve_precision",
           "runtime_settings", "seed_everything"]


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


def resolve_precision(name: str, device: torch.device, setting: str = "train.precision") -> str:
    """``auto`` -> bf16 autocast on CUDA, fp32 on CPU (where bf16 autocast is slower on most machines)."""
    if name == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if name not in PRECISIONS:
        raise HmerzooError(f"{setting}: expected one of {', '.join(PRECISIONS)}, got {name!r}")
    if name == "fp16" and device.type != "cuda":
        raise HmerzooError(f"{setting}=fp16: float16 autocast with loss scaling is for CUDA; use fp32 or bf16")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise HmerzooError(f"{setting}=bf16: {torch.cuda.get_device_name(device)} has no bfloat16 support; "
                           "use fp16 or fp32")
    return name


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved precision (none for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def matmul_precision(deterministic: bool) -> str:
    """``torch.set_float32_matmul_precision`` of a run: ``high`` (TF32 matmuls and convolutions on Ampere and
    later GPUs, ~10 bits of mantissa, the usual choice for training and inference) unless a deterministic run
    asks for full-FP32 ``highest``."""
    return "highest" if deterministic else "high"


@contextlib.contextmanager
def _float32_matmul_precision(precision: str) -> Iterator[None]:
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def inference_settings(deterministic: bool = False) -> contextlib.AbstractContextManager:
    """The process-wide settings of eval/predict (the float32 matmul precision); restored afterwards."""
    return _float32_matmul_precision(matmul_precision(deterministic))


@contextlib.contextmanager
def runtime_settings(num_threads: int | None = None, deterministic: bool = False) -> Iterator[None]:
    """Thread count, deterministic mode and float32 matmul precision (:func:`matmul_precision`) for a run; the
    previous process settings come back afterwards."""
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn_benchmark, cudnn_deterministic = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if deterministic:
        # cuBLAS needs this before its first use to be deterministic; harmless when CUDA is absent.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a few CUDA kernels have no deterministic version; training should warn, not stop.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    try:
        with _float32_matmul_precision(matmul_precision(deterministic)):
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was_deterministic, warn_only=warn_only)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn_benchmark, cudnn_deterministic
