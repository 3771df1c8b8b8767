"""Expression recognition rate (ExpRate) and its error-tolerant variants, on token edit distance.

ExpRate is the fraction of expressions recognised exactly (edit distance 0 between predicted and reference
token sequences); ``le1``/``le2``/``le3`` are the fractions within 1, 2 and 3 token edits (cumulative, so
exprate <= le1 <= le2 <= le3). This is the token-level reading most HMER repositories report; the official CROHME
tool counts symbol label-graph errors instead, which is a different number.
"""
from __future__ import annotations

from typing import Sequence, Union

import editdistance

TOLERANCES = (1, 2, 3)  # the ≤k columns every HMER paper reports
# A sequence is token ids, token strings, or one space-separated LaTeX string.
TokenSequence = Union[Sequence[int], Sequence[str], str]


def _tokens(seq: TokenSequence) -> list:
    return seq.split() if isinstance(seq, str) else list(seq)


def edit_distance(pred: TokenSequence, target: TokenSequence) -> int:
    """Levenshtein distance between two token sequences (a string counts as space-separated tokens)."""
    return int(editdistance.eval(_tokens(pred), _tokens(target)))


class ExpRateMeter:
    """Accumulates edit distances over batches; ``compute()`` gives the rates so far.

    Only a histogram of distances 0..3 (and "more") is kept, so meters from several processes merge by adding
    their histograms (:meth:`merge`).
    """

    def __init__(self) -> None:
        self.histogram = [0] * (max(TOLERANCES) + 2)  # counts of distance 0, 1, 2, 3 and > 3

    def reset(self) -> None:
        self.histogram = [0] * len(self.histogram)

    @property
    def count(self) -> int:
        return sum(self.histogram)

    def update(self, preds: Sequence[TokenSequence], targets: Sequence[TokenSequence]) -> list[int]:
        """Add one batch; returns the edit distance of each pair (useful for prediction files)."""
        if len(preds) != len(targets):
            raise ValueError(f"ExpRateMeter.update: {len(preds)} predictions but {len(targets)} references")
        distances = [edit_distance(p, t) for p, t in zip(preds, targets)]
        last = len(self.histogram) - 1
        for d in distances:
            self.histogram[min(d, last)] += 1
        return distances

    def merge(self, other: "ExpRateMeter") -> None:
        self.histogram = [a + b for a, b in zip(self.histogram, other.histogram)]

    def compute(self) -> dict[str, float | int]:
        """{"exprate", "le1", "le2", "le3"} as fractions in [0, 1], plus "count". All rates are 0.0 when empty."""
        n = self.count
        result: dict[str, float | int] = {"exprate": self.histogram[0] / n if n else 0.0}
        for k in TOLERANCES:
            result[f"le{k}"] = sum(self.histogram[:k + 1]) / n if n else 0.0
        result["count"] = n
        return result

    def __repr__(self) -> str:
        r = self.compute()
        return (f"ExpRateMeter(count={r['count']}, exprate={r['exprate']:.4f}, le1={r['le1']:.4f}, "
                f"le2={r['le2']:.4f}, le3={r['le3']:.4f})")


def exprate(preds: Sequence[TokenSequence], targets: Sequence[TokenSequence]) -> dict[str, float | int]:
    """ExpRate, ≤1, ≤2, ≤3 and count of two parallel lists of token sequences."""
    meter = ExpRateMeter()
    meter.update(preds, targets)
    return meter.compute()
