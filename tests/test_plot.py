"""``hmerzoo plot``: the curves of real (toy-model) training runs, read back from the figure that was drawn."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="hmerzoo plot needs matplotlib (the [plots] extra)")

from hmerzoo import plots, training  # noqa: E402
from hmerzoo.cli import main  # noqa: E402
from test_trainer import COSINE, quiet, read_metrics, toy_data, toy_recipe  # noqa: E402,F401  (toy_data: fixture)


def _line(ax, label):
    found = [line for line in ax.lines if line.get_label() == label]
    assert len(found) == 1, [line.get_label() for line in ax.lines]
    return found[0]


def test_two_real_runs_on_one_figure(tmp_path, toy_data):
    a = training.train(toy_recipe(tmp_path, "cosine", sched=COSINE), console=quiet())
    b = training.train(toy_recipe(tmp_path, "constant", epochs=2), console=quiet())
    fig = plots.plot_runs([plots.read_metrics(a), plots.read_metrics(b)])
    loss_ax, val_ax, lr_ax = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["training loss", "validation ExpRate", "learning rate"]
    for ax in fig.axes:
        assert sorted(line.get_label() for line in ax.lines) == ["constant", "cosine"]
    records = read_metrics(a)
    train_lines = [r for r in records if "loss" in r]
    val_lines = [r for r in records if "val/exprate" in r]
    assert len(val_lines) == 3  # 3 epochs, validated after each
    steps, losses = _line(loss_ax, "cosine").get_data()
    assert list(steps) == [r["step"] for r in train_lines]
    assert list(losses) == pytest.approx([r["loss"] for r in train_lines])
    steps, rates = _line(val_ax, "cosine").get_data()
    assert list(steps) == [r["step"] for r in val_lines]
    assert list(rates) == pytest.approx([r["val/exprate"] for r in val_lines])
    _, lrs = _line(lr_ax, "cosine").get_data()
    assert list(lrs) == pytest.approx([r["lr"] for r in train_lines])
    assert max(lrs) > min(lrs)  # the cosine schedule moved the lr; the constant run did not
    _, constant_lrs = _line(lr_ax, "constant").get_data()
    assert set(constant_lrs) == {0.5}
    assert len(_line(val_ax, "constant").get_data()[0]) == 2

    out = tmp_path / "curves.png"
    assert main(["plot", str(a), str(b), "--out", str(out), "--name", "A", "--name", "B"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_without_validation_and_bad_inputs(tmp_path, capsys):
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    lines = [{"step": s, "epoch": 0, "loss": 3.0 - s / 10, "lr": 1e-3} for s in range(1, 6)]
    metrics.write_text("\n".join(json.dumps(r) for r in lines) + "\n{\"step\": 6, \"lo")  # a line cut by a crash
    curves = plots.read_metrics(metrics.parent)
    assert curves.name == "run" and len(curves.points["loss"]) == 5 and "val/exprate" not in curves.points
    fig = plots.plot_runs([curves])
    assert [len(ax.lines) for ax in fig.axes] == [1, 0, 1]
    assert "no val/exprate" in fig.axes[1].texts[0].get_text()

    assert main(["plot", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().out


def test_missing_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(plots.HmerzooError, match=r"hmerzoo\[plots\]"):
        plots.require_matplotlib()
