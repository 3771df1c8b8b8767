"""What a run shows and writes as it goes: ``metrics.jsonl`` and the progress bar or plain progress lines."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping

from ..checkpoint import atomic_write_text

METRICS_FILE = "metrics.jsonl"


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
