"""Training extras: the EMA copy of the weights (train.ema_decay) and torch.compile (train.compile)."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """The EMA copy of ``model`` for train.ema_decay: a torch ``AveragedModel`` (its ``module`` and ``n_averaged``)
    whose update is the EMA without host syncs (:class:`ExponentialAverage`). The float buffers (BatchNorm running
    statistics) are averaged like the parameters, so they follow the averaged weights; integer buffers
    (``num_batches_tracked``) are copied. Its first update copies the model (``n_averaged`` 0)."""
    ema = ExponentialAverage(model, decay)
    ema.requires_grad_(False)
    return ema


class ExponentialAverage(torch.optim.swa_utils.AveragedModel):
    """``AveragedModel`` with the EMA update ``ema += (1 - decay) * (model - ema)`` (``torch._foreach_lerp_``, as
    torch's ``get_ema_multi_avg_fn``, one call per device and dtype) over the float parameters and buffers.

    Why not torch's ``update_parameters``: it asks ``n_averaged == 0`` of a device tensor once per parameter (a host
    sync each) and runs the EMA formula on integer buffers one small kernel at a time. Here whether this is the
    first update is known on the host: a count mirrored from ``n_averaged``, read again only when something else
    wrote it (a resumed run's ``fill_``, seen through the tensor's version counter)."""

    def __init__(self, model: nn.Module, decay: float):
        from torch.optim.swa_utils import get_ema_multi_avg_fn

        # multi_avg_fn is not used by the update below; it keeps the object what torch's EMA would be
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.decay = decay
        self._count, self._count_version = 0, self.n_averaged._version

    def _averaged_so_far(self) -> int:
        if self.n_averaged._version != self._count_version:
            self._count = int(self.n_averaged)  # written from outside (restored): read it once
            self._count_version = self.n_averaged._version
        return self._count

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        ours = [*self.module.parameters(), *self.module.buffers()]
        theirs = [*model.parameters(), *model.buffers()]
        first = self._averaged_so_far() == 0
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        copies: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        for mine, source in zip(ours, theirs):
            source = source.detach()
            if source.device != mine.device:
                source = source.to(mine.device, non_blocking=True)
            if first or not mine.is_floating_point():
                copies[0].append(mine.detach())
                copies[1].append(source)
            else:
                group = groups.setdefault((mine.device, mine.dtype), ([], []))
                group[0].append(mine.detach())
                group[1].append(source)
        if copies[0]:
            torch._foreach_copy_(copies[0], copies[1])
        for mine_list, source_list in groups.values():
            torch._foreach_lerp_(mine_list, source_list, 1.0 - self.decay)
        self.n_averaged += 1
        self._count += 1
        self._count_version = self.n_averaged._version


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
