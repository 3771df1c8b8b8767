"""The account of samples left out: bad ones skipped with ``data.skip_bad`` and ones training filters out."""
from __future__ import annotations

from collections import Counter


class DataReport:
    """Counts per (split, reason) and the first few examples of each, for the trainer to print at the end."""

    def __init__(self, max_examples: int = 3):
        self.max_examples = max_examples
        self.counts: Counter[tuple[str, str]] = Counter()
        self.examples: dict[tuple[str, str], list[str]] = {}
        self.filtered_keys: set[tuple[str, str]] = set()

    def add(self, split: str, reason: str, message: str, filtered: bool = False) -> None:
        """Record one sample left out. ``filtered``: dropped by a training limit rather than broken."""
        key = (split, reason)
        self.counts[key] += 1
        examples = self.examples.setdefault(key, [])
        if len(examples) < self.max_examples:
            examples.append(message)
        if filtered:
            self.filtered_keys.add(key)

    def count(self, reason: str | None = None, split: str | None = None) -> int:
        return sum(n for (s, r), n in self.counts.items()
                   if (reason is None or r == reason) and (split is None or s == split))

    @property
    def num_skipped(self) -> int:
        """Bad samples skipped (unknown token, empty caption, missing or unreadable image, ...)."""
        return sum(n for key, n in self.counts.items() if key not in self.filtered_keys)

    @property
    def num_filtered(self) -> int:
        """Good samples that training leaves out (too long, too large)."""
        return sum(n for key, n in self.counts.items() if key in self.filtered_keys)

    def __len__(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:
        return len(self) > 0

    def merge(self, other: "DataReport") -> None:
        for key, n in other.counts.items():
            self.counts[key] += n
            examples = self.examples.setdefault(key, [])
            examples.extend(other.examples.get(key, [])[: max(0, self.max_examples - len(examples))])
        self.filtered_keys |= other.filtered_keys

    def to_dict(self) -> dict:
        """Plain data (for a run's metrics file)."""
        return {"skipped": self.num_skipped, "filtered": self.num_filtered,
                "counts": {f"{s}: {r}": n for (s, r), n in sorted(self.counts.items())}}

    def summary(self) -> str:
        if not self:
            return "data: no samples left out"
        lines = [f"data: {len(self)} samples left out ({self.num_skipped} bad and skipped, "
                 f"{self.num_filtered} filtered by training limits)"]
        for key in sorted(self.counts):
            split, reason = key
            kind = "filtered" if key in self.filtered_keys else "skipped"
            lines.append(f"  {split or '-'}: {reason}: {self.counts[key]} {kind}")
            for example in self.examples.get(key, []):
                lines.append(f"      e.g. {example}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"DataReport(skipped={self.num_skipped}, filtered={self.num_filtered})"
