"""ExpRate and the ≤k rates on hand-made examples."""
from __future__ import annotations

import pytest

from hmerzoo.metrics import ExpRateMeter, edit_distance, exprate


def test_edit_distance_on_ids_and_strings():
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3], [1, 3]) == 1  # one deletion
    assert edit_distance([1, 2, 3], [1, 4, 3, 5]) == 2  # substitution + insertion
    assert edit_distance("\\frac { a } { b }", "\\frac { a } { c }") == 1  # space-separated tokens, not characters
    assert edit_distance([], [7, 8, 9]) == 3


def test_distance_two_counts_for_le2_and_le3_only():
    result = exprate([[1, 9, 9, 4]], [[1, 2, 3, 4]])
    assert result == {"exprate": 0.0, "le1": 0.0, "le2": 1.0, "le3": 1.0, "count": 1}


def test_rates_are_cumulative_fractions():
    targets = [[1, 2, 3, 4, 5]] * 5
    preds = [
        [1, 2, 3, 4, 5],  # 0
        [1, 2, 3, 4],  # 1
        [1, 2, 3],  # 2
        [1, 2],  # 3
        [9, 9, 9, 9, 9, 9],  # 6
    ]
    meter = ExpRateMeter()
    distances = meter.update(preds, targets)
    assert distances == [0, 1, 2, 3, 6]
    result = meter.compute()
    assert result["count"] == 5
    assert result["exprate"] == pytest.approx(1 / 5)
    assert result["le1"] == pytest.approx(2 / 5)
    assert result["le2"] == pytest.approx(3 / 5)
    assert result["le3"] == pytest.approx(4 / 5)
    for key in ("exprate", "le1", "le2", "le3"):
        assert 0.0 <= result[key] <= 1.0


def test_meter_accumulates_over_batches_and_merges():
    a, b = ExpRateMeter(), ExpRateMeter()
    a.update([[1]], [[1]])
    a.update([[2]], [[3]])
    b.update([[1, 2]], [[1, 2]])
    a.merge(b)
    result = a.compute()
    assert result["count"] == 3
    assert result["exprate"] == pytest.approx(2 / 3)
    assert result["le1"] == pytest.approx(1.0)
    a.reset()
    assert a.compute() == {"exprate": 0.0, "le1": 0.0, "le2": 0.0, "le3": 0.0, "count": 0}


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        ExpRateMeter().update([[1], [2]], [[1]])
