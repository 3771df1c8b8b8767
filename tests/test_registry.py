import pytest
import torch.nn as nn

import hmerzoo
from hmerzoo.errors import RecipeError
from hmerzoo.registry import DECODERS, Registry


def test_register_and_get():
    reg = Registry("widget", "WIDGETS")

    @reg.register("a")
    class A:
        pass

    assert reg.get("a") is A
    assert reg.names() == ["a"]
    assert "a" in reg and len(reg) == 1


def test_duplicate_name_raises_unless_override():
    reg = Registry("widget", "WIDGETS")
    reg.register("a")(type("A", (), {}))
    with pytest.raises(KeyError, match="already registered.*override=True"):
        reg.register("a")(type("B", (), {}))
    B = reg.register("a", override=True)(type("B", (), {}))
    assert reg.get("a") is B


def test_unknown_name_message_has_path_suggestion_names_and_how_to_add():
    with pytest.raises(RecipeError) as e:
        DECODERS.get("btr", "model.decoder.type")
    msg = str(e.value)
    assert "model.decoder.type" in msg
    assert "did you mean 'bttr'" in msg
    assert "Registered decoders:" in msg and "bttr" in msg
    assert "imports:" in msg and "--import" in msg and "my_pkg.my_mod:MyClass" in msg


def test_dotted_type_imports_class():
    assert DECODERS.get("torch.nn:GRU") is nn.GRU
    with pytest.raises(RecipeError, match="has no attribute 'GRUU'.*did you mean 'GRU'"):
        DECODERS.get("torch.nn:GRUU", "model.decoder.type")
    with pytest.raises(RecipeError, match="cannot import module 'no_such_mod_xyz'"):
        DECODERS.get("no_such_mod_xyz:X", "model.decoder.type")


def test_builtin_components_registered():
    assert {"densenet", "timm"} <= set(hmerzoo.ENCODERS.names())
    assert "bttr_projection" in hmerzoo.NECKS.names()
    assert "bttr" in hmerzoo.DECODERS.names()
    assert {"adadelta", "sgd", "adamw"} <= set(hmerzoo.OPTIMIZERS.names())
    assert {"plateau", "cosine"} <= set(hmerzoo.SCHEDULERS.names())
