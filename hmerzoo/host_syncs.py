"""Count the places where the CPU would wait for the GPU, on any device (CPU included).

A small model on a fast GPU is bound by kernel launches: every time Python needs a value computed on the device
(``.item()``, ``if tensor:``, a boolean-mask index whose output size depends on the data) or copies from the host
without ``non_blocking``, the launch queue drains and the GPU idles. Those calls are visible on the CPU too, so a
developer without a GPU can count them::

    with HostSyncCounter() as syncs:
        model(batch)["loss"].backward()
    print(syncs.summary())          # counts by kind, and the hmerzoo lines that made them

On the CPU, device copies are counted where they *would* block on a GPU: a ``.to(device)`` / ``.cuda()`` /
``.cpu()`` without ``non_blocking=True``, and ``torch.tensor(..., device=...)`` from Python data.
"""
from __future__ import annotations

import collections
import traceback
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch.overrides import TorchFunctionMode

# device -> host reads: the result is needed in Python, so the host waits for every queued kernel
READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "equal", "allclose"}
# the output's size depends on the data: the host must read a count before it can allocate
DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "_unique2",
                  "repeat_interleave"}
MOVES = {"to", "cuda", "cpu"}
FACTORIES = {"tensor", "as_tensor"}


def _is_bool_index(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _moves_device(args: tuple, kwargs: dict) -> bool:
    """Does a ``Tensor.to`` call name a device (or a tensor to match), rather than only a dtype?"""
    if "device" in kwargs or "other" in kwargs:
        return True
    return any(isinstance(a, (str, torch.device, torch.Tensor)) for a in args[1:])


@dataclass
class SyncEvent:
    kind: str  # "read", "data-dependent", "bool-mask index", "blocking copy"
    function: str
    where: str  # the innermost hmerzoo frame, "path:line"


class HostSyncCounter(TorchFunctionMode):
    """A ``TorchFunctionMode`` that records every host sync and blocking copy made while it is active.

    ``frames_under``: where call sites are looked up (the innermost frame whose file path contains it).
    """

    def __init__(self, frames_under: str = "hmerzoo"):
        super().__init__()
        self.frames_under = frames_under
        self.events: list[SyncEvent] = []

    def __torch_function__(self, func: Any, types: Iterable[type], args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        kind = self.classify(getattr(func, "__name__", ""), args, kwargs)
        if kind is not None:
            self.events.append(SyncEvent(kind, getattr(func, "__name__", str(func)), self._call_site()))
        return func(*args, **kwargs)

    @staticmethod
    def classify(name: str, args: tuple, kwargs: dict) -> str | None:
        if name in READS:
            return "read"
        if name in DATA_DEPENDENT:
            if name == "repeat_interleave" and not (len(args) > 1 and isinstance(args[1], torch.Tensor)):
                return None  # an int repeat count has a known output size
            return "data-dependent"
        if name in ("__getitem__", "__setitem__", "index_put_", "index_put") and len(args) > 1:
            index = args[1]
            if name.startswith("index_put") and isinstance(index, (list, tuple)):
                index = tuple(index)
            return "bool-mask index" if _is_bool_index(index) else None
        if name in MOVES and not kwargs.get("non_blocking", False):
            if name == "to" and not _moves_device(args, kwargs):
                return None
            return "blocking copy"
        if name in FACTORIES and kwargs.get("device") is not None:
            return "blocking copy"
        return None

    def _call_site(self) -> str:
        for frame in reversed(traceback.extract_stack()):
            if self.frames_under in frame.filename and frame.filename != __file__:
                parts = frame.filename.split(self.frames_under, 1)
                return f"{self.frames_under}{parts[1]}:{frame.lineno}"
        return "?"

    # --- reading the record ---------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return len(self.events)

    def count(self, kind: str | None = None) -> int:
        return sum(1 for e in self.events if kind is None or e.kind == kind)

    def by_kind(self) -> dict[str, int]:
        return dict(collections.Counter(e.kind for e in self.events))

    def by_site(self) -> list[tuple[str, str, int]]:
        """(call site, kind, count), most frequent first."""
        counts = collections.Counter((e.where, e.kind) for e in self.events)
        return [(where, kind, n) for (where, kind), n in counts.most_common()]

    def reset(self) -> None:
        self.events.clear()

    def summary(self, top: int = 10) -> str:
        lines = [f"{self.total} host syncs / blocking copies: " +
                 (", ".join(f"{k} {n}" for k, n in sorted(self.by_kind().items())) or "none")]
        lines += [f"  {n:5d}  {kind:16s} {where}" for where, kind, n in self.by_site()[:top]]
        return "\n".join(lines)
