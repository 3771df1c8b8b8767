import textwrap

import pytest
import yaml

from hmerzoo.cli import main
from hmerzoo.errors import RecipeError
from hmerzoo.recipe import list_recipes, load_recipe, merge, validate_recipe


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_recipes_load_and_validate():
    names = [p.stem for p in list_recipes()]
    assert "bttr" in names
    for path in list_recipes():
        validate_recipe(load_recipe(path), str(path))


def test_bttr_recipe_is_the_official_configuration():
    r = load_recipe("bttr")
    assert r["optim"] == {"type": "adadelta", "lr": 1.0, "eps": 1e-6, "weight_decay": 1e-4}
    assert r["sched"]["type"] == "plateau" and r["sched"]["factor"] == 0.1 and r["sched"]["mode"] == "max"
    assert r["data"]["batch_size"] == 8 and r["data"]["max_pixels"] == 320000
    assert r["train"]["epochs"] == 300
    assert r["decode"]["beam_size"] == 10 and r["decode"]["alpha"] == 1.0
    dec = r["model"]["decoder"]
    assert (dec["d_model"], dec["nhead"], dec["num_layers"], dec["dim_feedforward"], dec["dropout"]) == (256, 8, 3, 1024, 0.3)


def test_extends_deep_merges_and_replaces_node_with_new_type(tmp_path):
    write(tmp_path / "base.yaml", """
        name: base
        data: {batch_size: 8, max_len: 200}
        model:
          encoder: {type: densenet, growth_rate: 24}
          decoder: {type: bttr, nhead: 8}
        optim: {type: adadelta, lr: 1.0}
    """)
    write(tmp_path / "child.yaml", """
        extends: base.yaml
        name: child
        data: {batch_size: 4}
        model:
          encoder: {type: timm, name: resnet18}
        optim: {lr: 0.5}
    """)
    r = load_recipe(tmp_path / "child.yaml")
    assert r["name"] == "child"
    assert r["data"] == {"batch_size": 4, "max_len": 200}
    assert r["model"]["encoder"] == {"type": "timm", "name": "resnet18"}  # replaced, not merged
    assert r["model"]["decoder"] == {"type": "bttr", "nhead": 8}
    assert r["optim"] == {"type": "adadelta", "lr": 0.5}
    assert "extends" not in r


def test_extends_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_overrides_parse_yaml_and_delete():
    r = load_recipe("bttr", ["train.max_steps=30", "data.root=/x/y", "optim.lr=0.5", "~sched",
                             "model.decoder={type: bttr, nhead: 4}", "data.val_split='2014'"])
    assert r["train"]["max_steps"] == 30
    assert r["data"]["root"] == "/x/y"
    assert r["optim"]["lr"] == 0.5
    assert "sched" not in r
    assert r["model"]["decoder"]["nhead"] == 4 and r["model"]["decoder"]["d_model"] == 256  # same type: merged
    assert r["data"]["val_split"] == "2014"


def test_unknown_keys_and_types_all_reported_with_suggestions():
    r = load_recipe("bttr", ["train.max_step=30", "model.decoder.nheads=4", "data.batch_size=eight",
                             "optim.type=adadeltaa", "model.encoder.growth_rate=2.5"])
    with pytest.raises(RecipeError) as e:
        validate_recipe(r)
    msg = str(e.value)
    assert "5 problems" in msg
    assert "train.max_step: unknown key (did you mean 'max_steps'" in msg
    assert "model.decoder.nheads: unknown argument" in msg and "did you mean 'nhead'" in msg
    assert "data.batch_size: expected int, got str 'eight'" in msg
    assert "optim.type: unknown optimizer 'adadeltaa' (did you mean 'adadelta'?)" in msg
    assert "model.encoder.growth_rate: expected int, got float 2.5" in msg


def test_unknown_section_in_override_and_in_file(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown section 'datta' \(did you mean 'data'\?\)"):
        load_recipe("bttr", ["datta.root=x"])
    write(tmp_path / "r.yaml", "extends: bttr\ntrian: {epochs: 1}\n")
    with pytest.raises(RecipeError, match=r"trian: unknown section \(did you mean 'train'\?\)"):
        validate_recipe(load_recipe(tmp_path / "r.yaml"))


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path / "bad.yaml", "name: x\nmodel:\n  encoder: {type: densenet\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml:\d+:\d+: invalid YAML"):
        load_recipe(p)


def test_missing_required_argument_reported(tmp_path):
    r = load_recipe("bttr", ["model.encoder={type: timm}"])
    with pytest.raises(RecipeError, match="model.encoder.name: required argument of TimmEncoder is missing"):
        validate_recipe(r)


def test_cli_config_show_prints_resolved_recipe(capsys):
    assert main(["config", "show", "bttr", "train.max_steps=7"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["train"]["max_steps"] == 7 and out["name"] == "bttr"


def test_cli_misspelled_component_is_short_error_with_fix(capsys):
    assert main(["config", "validate", "bttr", "model.decoder.type=btr"]) == 2
    out = capsys.readouterr().out
    assert "unknown decoder 'btr' (did you mean 'bttr'?)" in out
    assert "Traceback" not in out


def test_merge_lists_replace():
    assert merge({"a": [1, 2], "b": {"c": 1}}, {"a": [3]}) == {"a": [3], "b": {"c": 1}}
