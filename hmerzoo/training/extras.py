"""Training extras: the EMA copy of the weights (train.ema_decay) and torch.compile (train.compile)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn


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
    own (e.g. the transformer layers, CoMER's ARM, ABM's branches, whose ``forward`` is one decoding step;
    ModuleLists/Dicts are looked into, plain Linear/Embedding/Dropout are left).

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
