"""When a run stops: a Ctrl-C honoured at the next step boundary, the stop the ranks agreed on, the wall-clock
budget (train.max_time), and the best-value tracking that picks the best checkpoint."""
from __future__ import annotations

import math
import signal
import threading
import time
from typing import Any, Iterator


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


def now() -> float:
    """The clock of train.max_time (monotonic seconds; tests replace it with a fake one)."""
    return time.monotonic()


class TimeBudget:
    """train.max_time: ``seconds`` of wall-clock time from the start of this invocation (None: no limit). The loop
    asks :meth:`expired` at step boundaries; several processes combine their answers so that all stop together."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.start = now()

    def expired(self) -> bool:
        return self.seconds is not None and now() - self.start >= self.seconds

    def describe(self) -> str:
        elapsed = now() - self.start
        return f"train.max_time ({self.seconds:g} s) reached after {elapsed:.0f} s"


def is_better(value: float, best: float | None, mode: str) -> bool:
    """Whether a finite monitored ``value`` improves on ``best`` (None: nothing yet) for train.monitor_mode."""
    if not math.isfinite(value):
        return False
    return best is None or (value > best if mode == "max" else value < best)
