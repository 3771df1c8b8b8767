"""train.max_time (a wall-clock budget per invocation, then a checkpoint and --resume auto), the config sections'
own range checks, one recipe validation on the train path, and CLI overrides after options. Toy model and data of
test_trainer.py, on CPU; the clock is a fake one driven by the training forwards, so nothing sleeps."""
from __future__ import annotations

import pytest
import torch
import yaml

from hmerzoo import builder, cli, recipe as recipe_mod
from hmerzoo import training
from hmerzoo.checkpoint import latest_checkpoint, list_checkpoints
from hmerzoo.config import DataConfig, DecodeConfig, SectionError, TrainConfig, parse_duration
from hmerzoo.errors import RecipeError
from hmerzoo.training import loop as training_loop
from hmerzoo.training import stopping
from test_trainer import HOOKS, assert_same_run, quiet, read_metrics, toy_data, toy_recipe  # noqa: F401

SECONDS_PER_FORWARD = 10.0


@pytest.fixture
def fake_clock(monkeypatch):
    """Ten seconds pass with every training forward (the toy model counts them); nothing else moves the clock."""
    monkeypatch.setattr(stopping, "now", lambda: HOOKS.train_forwards * SECONDS_PER_FORWARD)


def steps_of(ckpt) -> tuple[int, int, int]:
    state = torch.load(ckpt.trainer_state, weights_only=True)
    return state["step"], state["epoch"], state["position"]


# --- train.max_time -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget,stops", [("35s", [(4, 0, 4), (8, 1, 3)]),  # mid-epoch (5 buckets per epoch)
                                          (50, [(5, 0, 5), (10, 1, 5)])])  # an epoch's last step, not validated
def test_max_time_stops_with_a_checkpoint_and_resume_continues_exactly(tmp_path, toy_data, fake_clock, budget,
                                                                       stops):
    straight = training.train(toy_recipe(tmp_path, "straight"), console=quiet())
    assert latest_checkpoint(straight).step == 15
    HOOKS.reset()

    limited = toy_recipe(tmp_path, "limited", max_time=budget)
    for expected in stops:  # each invocation gets the budget afresh, from its own start
        run_dir = training.train(limited, resume="auto", console=quiet())  # returns normally
        assert steps_of(latest_checkpoint(run_dir)) == expected
        assert HOOKS.train_forwards == expected[0]  # stopped at the first step boundary past the budget
    unlimited = toy_recipe(tmp_path, "limited")
    training.train(unlimited, resume="auto", console=quiet())
    assert_same_run(straight, tmp_path / "limited")  # the same losses, validations and weights as one run
    assert [r["step"] for r in read_metrics(tmp_path / "limited") if "loss" in r] == list(range(1, 16))


def test_max_time_is_checked_before_a_step_too(tmp_path, toy_data, monkeypatch):
    """A budget already spent when the loop starts (e.g. by a long validation) trains no step."""
    ticks = iter(range(0, 10_000, 100))
    monkeypatch.setattr(stopping, "now", lambda: float(next(ticks)))
    run_dir = training.train(toy_recipe(tmp_path, "run", max_time=1), console=quiet())
    assert HOOKS.train_forwards == 0 and latest_checkpoint(run_dir).step == 0


def test_max_time_values():
    assert [parse_duration(v) for v in ("90s", "30m", "8h", "1h30m", "2d", "45", 12, 0.5)] == \
        [90, 1800, 8 * 3600, 5400, 2 * 86400, 45, 12, 0.5]
    assert parse_duration(None) is None
    for bad in ("soon", "10 parsecs", "0", -5, "", "m"):
        with pytest.raises(RecipeError, match=r"train\.max_time: expected a positive duration"):
            parse_duration(bad)
    with pytest.raises(RecipeError, match=r"train\.max_time.*'tomorrow'"):
        recipe_mod.validate_recipe(recipe_mod.load_recipe("bttr", ["train.max_time=tomorrow"]))


# --- sections check themselves --------------------------------------------------------------------------------
def test_sections_report_all_their_range_problems():
    with pytest.raises(SectionError) as e:
        TrainConfig(epochs=0, precision="bf61", monitor_mode="maxx", grad_clip=0.0)
    assert e.value.problems == ["train.epochs: must be >= 1, got 0",
                                "train.precision: expected one of auto, fp32, bf16, fp16, got 'bf61' "
                                "(did you mean 'bf16'?)",
                                "train.monitor_mode: expected one of max, min, got 'maxx' (did you mean 'max'?)",
                                "train.grad_clip: must be > 0 or null, got 0.0"]
    with pytest.raises(RecipeError, match=r"data\.train_limit: must be >= 1 or null, got 0"):
        DataConfig(train_limit=0)
    with pytest.raises(ValueError, match=r"decode\.beam_size: must be >= 1, got 0"):  # also a ValueError
        DecodeConfig(beam_size=0)
    # validate_recipe reports range problems with the others, once each
    r = recipe_mod.load_recipe("bttr", ["data.batch_size=0", "decode.batching=pad", "train.nosuch=1"])
    with pytest.raises(RecipeError) as e:
        recipe_mod.validate_recipe(r)
    assert len(e.value.problems) == 3
    assert "data.batch_size: must be >= 1, got 0" in e.value.problems
    assert any(p.startswith("decode.batching: expected one of per_image, padded") for p in e.value.problems)


# --- one validation, and the CLI --------------------------------------------------------------------------------
def test_cli_train_takes_overrides_after_options_and_validates_once(tmp_path, toy_data, monkeypatch):
    calls = []
    real = recipe_mod.validate_recipe

    def counting(recipe, source=None):
        calls.append(source)
        return real(recipe, source)

    for module in (recipe_mod, builder, training_loop):
        monkeypatch.setattr(module, "validate_recipe", counting)
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(toy_recipe(tmp_path, "run", max_steps=3, val_every=0)))
    assert cli.main(["train", str(path), "--resume", "auto", "train.max_steps=2", "train.keep_last=0"]) == 0
    assert calls == [str(path)]  # once, with the recipe's name for messages
    assert [c.step for c in list_checkpoints(tmp_path / "run")] == [2]  # the override after the option applied


def test_cli_overrides_after_options_for_the_other_verbs(capsys):
    assert cli.main(["config", "show", "bttr", "--import", "hmerzoo.components", "train.epochs=5"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["train"]["epochs"] == 5
    args = cli.build_parser().parse_args(["predict", "MODEL", "--json", "a.png", "--beam", "3", "b.png"])
    assert (args.model, args.images, args.json, args.beam) == ("MODEL", ["a.png", "b.png"], True, 3)
