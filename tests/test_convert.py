"""The converters against hmerzoo's own models, no fixtures needed: every parameter of each shipped recipe's model
is reachable from an official key (so renaming a parameter breaks this test), a small model's weights survive the
round trip official keys -> ``hmerzoo.convert`` -> ``load_model``, each family is recognised by its keys, and a
checkpoint given to the wrong converter is named for what it is. With the parity fixtures, the same on the real
official files.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import hmerzoo
from hmerzoo.builder import build_model
from hmerzoo.cli import main
from hmerzoo.convert import CONVERTERS, convert, families_of
from hmerzoo.convert.abm import ABM_BRANCHES, ABM_PACKED, ABM_RENAMES
from hmerzoo.convert.can import CAN_PREFIXES
from hmerzoo.convert.bttr import BTTR_PREFIXES
from hmerzoo.convert.comer import COMER_PREFIXES
from hmerzoo.convert.hmer_mtl import HMER_MTL_PREFIXES
from hmerzoo.convert.ical import ICAL_PREFIXES
from hmerzoo.convert.posformer import POSFORMER_PREFIXES
from hmerzoo.convert.tamer import TAMER_PREFIXES
from hmerzoo.errors import CheckpointError
from hmerzoo.registry import Registry
from hmerzoo.vocab import Vocabulary

FAMILIES = {"bttr": "BTTR", "comer": "CoMER", "hmer_mtl": "HMER-MTL", "abm": "ABM", "ical": "ICAL", "tamer": "TAMER",
            "can": "CAN", "posformer": "PosFormer"}
TRANSFORMER = ["model.encoder.growth_rate=4", "model.encoder.num_layers=2", "model.neck.d_model=32",
               "model.decoder.d_model=32", "model.decoder.num_layers=2", "model.decoder.dim_feedforward=64"]
TINY = {
    "bttr": TRANSFORMER,  # nhead stays 8: without hyper-parameters the converter takes the official 8
    "comer": TRANSFORMER + ["model.decoder.nhead=4", "model.decoder.dc=8"],  # nhead read off the ARM
    "hmer_mtl": TRANSFORMER + ["model.decoder.nhead=4", "model.decoder.dc=8"],
    "ical": TRANSFORMER + ["model.decoder.nhead=4", "model.decoder.dc=8", "model.heads.implicit.dim_feedforward=64"],
    "tamer": TRANSFORMER + ["model.decoder.nhead=4", "model.decoder.dc=8", "model.heads.structure.dim_feedforward=64"],
    "posformer": TRANSFORMER + ["model.decoder.nhead=4", "model.decoder.dc=8"],  # the position decoder follows
    "abm": ["model.encoder.growth_rate=4", "model.encoder.num_layers=2", "model.decoder.hidden_size=16",
            "model.decoder.embed_dim=8", "model.decoder.attention_dim=16", "model.decoder.coverage_channels=8"],
    "can": ["model.encoder.growth_rate=4", "model.encoder.num_layers=2", "model.decoder.hidden_size=16",
            "model.decoder.embed_dim=8", "model.decoder.attention_dim=16", "model.decoder.coverage_channels=8",
            "model.decoder.counting_channels=32"],
}
# vocabularies that list their start/stop tokens themselves (ABM: 'sos 0', 'eos 1'; CAN: 'eos', 'sos' lines)
OWN_SPECIALS = {"abm", "can"}
# the Lightning attribute that holds the model in each official checkpoint
LIGHTNING_PREFIX = {"bttr": "bttr.", "comer": "comer_model.", "hmer_mtl": "comer_model.", "abm": "", "ical": "ical_model.",
                    "tamer": "tamer_model.", "can": "", "posformer": "model."}
PREFIX_TABLES = {"bttr": BTTR_PREFIXES, "comer": COMER_PREFIXES, "hmer_mtl": HMER_MTL_PREFIXES, "ical": ICAL_PREFIXES,
                 "tamer": TAMER_PREFIXES, "can": CAN_PREFIXES, "posformer": POSFORMER_PREFIXES}
SPACE_FAMILIES = ("hmer_mtl", "ical")  # vocabularies with <space> = 3


# ---------------------------------------------------------------------------------------------------------------
# official keys of a hmerzoo model: the converters' tables read backwards
def official_abm_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    suffixes = dict(ABM_BRANCHES)
    out = {}
    for key, value in state.items():
        if key.startswith("encoder."):
            out["encoder1." + key[len("encoder."):]] = value
            continue
        _, direction, rest = key.split(".", 2)
        suffix = suffixes[direction]
        packed, _, kind = rest.partition(".")
        if packed in ABM_PACKED:  # one hmerzoo linear = the official three gate layers
            for gate, chunk in zip(ABM_PACKED[packed], value.chunk(3, dim=0)):
                module, _, name = gate.partition(".")
                out[f"{module}{suffix}.{name}.{kind}"] = chunk
            continue
        old, new = next((o, n) for o, n in ABM_RENAMES.items() if rest.startswith(n))
        module, _, name = old.partition(".")
        out[f"{module}{suffix}.{name}{rest[len(new):]}"] = value
    return out


def official_state(name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (hmerzoo keys) under the official keys a Lightning checkpoint of ``name`` has."""
    if name == "abm":
        return official_abm_keys(state)
    out = {}
    for key, value in state.items():
        matches = [(old, new) for old, new in PREFIX_TABLES[name] if key.startswith(new)]
        assert matches, f"{name}: hmerzoo parameter {key} has no official key in the converter's table"
        old, new = max(matches, key=lambda m: len(m[1]))
        out[LIGHTNING_PREFIX[name] + old + key[len(new):]] = value
    return out


def dictionary(folder: Path, name: str, n: int = 12) -> Path:
    path = folder / "dictionary.txt"
    if name == "abm":  # ABM's own format: 'token<TAB>id', sos and eos listed first
        path.write_text("".join(f"{t}\t{i}\n" for i, t in enumerate(["sos", "eos"] + [f"t{i}" for i in range(n)])))
    elif name == "can":  # CAN's words_dict.txt: one token per line, eos and sos first
        path.write_text("".join(f"{t}\n" for t in ["eos", "sos"] + [f"t{i}" for i in range(n)]))
    else:  # PosFormer's decoders name the symbols whose steps their coverage skips
        symbols = ["{", "^", "_"] if name == "posformer" else []
        path.write_text("".join(f"{t}\n" for t in symbols + [f"t{i}" for i in range(n)]))
    return path


def tiny_model(name: str, folder: Path) -> hmerzoo.model.HMERModel:
    path = dictionary(folder, name)
    if name in OWN_SPECIALS:
        vocab = Vocabulary.from_dictionary(str(path), [], roles={"sos": "sos", "eos": "eos"})
    else:
        specials = ["<pad>", "<sos>", "<eos>"] + (["<space>"] if name in SPACE_FAMILIES else [])
        vocab = Vocabulary.from_dictionary(str(path), specials)
    torch.manual_seed(0)
    model = build_model(name, TINY[name], vocab=vocab)
    with torch.no_grad():  # non-default statistics, so that a buffer lost on the way shows
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def official(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, hmerzoo.model.HMERModel]:
    """(name, an official-looking checkpoint of a tiny model with dictionary.txt beside it, the model)."""
    name = request.param
    folder = tmp_path_factory.mktemp(f"official_{name}")
    model = tiny_model(name, folder)
    path = folder / f"{name}_checkpoint.safetensors"
    save_file({k: v.contiguous() for k, v in official_state(name, model.state_dict()).items()}, str(path))
    return name, path, model


# ---------------------------------------------------------------------------------------------------------------
def test_converters_are_registered() -> None:
    assert isinstance(CONVERTERS, Registry) and CONVERTERS.names() == sorted(FAMILIES)
    assert {name: cls.family for name, cls in CONVERTERS.items()} == FAMILIES


def test_every_parameter_of_the_shipped_recipes_has_an_official_key(tmp_path: Path) -> None:
    """The full-size models of the shipped recipes: each hmerzoo key comes from exactly one official key."""
    for name in FAMILIES:
        folder = tmp_path / name
        folder.mkdir()
        path = dictionary(folder, name, 110)
        specials = ([] if name in OWN_SPECIALS
                    else ["<pad>", "<sos>", "<eos>"] + (["<space>"] if name in SPACE_FAMILIES else []))
        roles = {"sos": "sos", "eos": "eos"} if name in OWN_SPECIALS else None
        model = build_model(name, vocab=Vocabulary.from_dictionary(str(path), specials, roles=roles))
        state = model.state_dict()
        converted = CONVERTERS.get(name)().convert(official_state(name, state), path, {}).state
        assert converted.keys() == state.keys(), name
        assert all(torch.equal(converted[k], state[k]) for k in state), name


def test_round_trip_through_convert(official, tmp_path: Path) -> None:
    name, path, model = official
    loaded = hmerzoo.load_model(convert(name, path, tmp_path / "out"))
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    assert loaded.num_parameters() == model.num_parameters()


def test_each_family_is_recognised_by_its_keys(official) -> None:
    name, path, _ = official
    from safetensors.torch import load_file

    state = load_file(str(path))
    assert families_of(state) == [name]
    prefix = LIGHTNING_PREFIX[name]
    if prefix:  # a state dict of the inner module, saved without the Lightning attribute
        assert families_of({k[len(prefix):]: v for k, v in state.items()}) == [name]


def test_a_checkpoint_of_another_family_is_named(official, tmp_path: Path) -> None:
    name, path, _ = official
    for other in FAMILIES:
        if other == name:
            continue
        with pytest.raises(CheckpointError) as info:
            convert(other, path, tmp_path / other)
        message = str(info.value)
        assert message.startswith(f"{path}: this is a {FAMILIES[name]} checkpoint"), message
        assert f"not a {FAMILIES[other]} one" in message and f"use `hmerzoo convert {name}`" in message
        assert not (tmp_path / other).exists()


def test_a_checkpoint_of_no_known_family(tmp_path: Path) -> None:
    path = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(2, 3, 3, 3), "fc.weight": torch.zeros(4, 2)}, str(path))
    dictionary(tmp_path, "bttr")
    with pytest.raises(CheckpointError) as info:
        convert("bttr", path, tmp_path / "out")
    message = str(info.value)
    assert message.startswith(f"{path}: its keys (conv1.weight, fc.weight, ...) belong to no model hmerzoo converts")
    for name, family in FAMILIES.items():
        assert f"{name} (keys" in message
    assert families_of({"conv1.weight": torch.zeros(1)}) == []


def test_cli_names_the_file_and_the_right_converter(official, tmp_path: Path, capsys) -> None:
    name, path, _ = official
    other = "abm" if name != "abm" else "bttr"
    status = main(["convert", other, str(path), "--out", str(tmp_path / "out")])
    output = capsys.readouterr().out
    assert status == 2 and "Traceback" not in output
    text = " ".join(output.split())  # the console wraps long lines
    assert f"error: {path}: this is a {FAMILIES[name]} checkpoint" in text
    assert f"use `hmerzoo convert {name}`" in text


def test_converter_errors_name_the_file(official, tmp_path: Path) -> None:
    """A checkpoint of the right family that the converter still refuses (here: one key too many)."""
    name, path, _ = official
    from safetensors.torch import load_file

    state = load_file(str(path))
    extra_key = "gru_model.extra.weight" if name == "abm" else f"{LIGHTNING_PREFIX[name]}decoder.extra.weight"
    broken = tmp_path / "broken.safetensors"
    save_file({**state, extra_key: torch.zeros(1)}, str(broken))
    shutil.copy(path.parent / "dictionary.txt", tmp_path / "dictionary.txt")
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(broken))}: 1 keys of the checkpoint are not part of an official"):
        convert(name, broken, tmp_path / "out")


def test_list_converters(capsys) -> None:
    assert main(["list", "converters"]) == 0
    output = capsys.readouterr().out
    for name in FAMILIES:
        assert name in output


# ---------------------------------------------------------------------------------------------------------------
# the real official files (parity fixtures)
@pytest.mark.parametrize("name", list(FAMILIES))
def test_official_fixture_given_to_every_other_converter(parity_dir: Path, tmp_path: Path, name: str) -> None:
    # the goldens generated here (ICAL, TAMER, PosFormer, CAN) are committed in tests/goldens/, the others are in ../shared
    goldens = Path(__file__).resolve().parent / "goldens"
    folder = goldens / name if (goldens / name).is_dir() else parity_dir / name
    source = folder / "state_dict.safetensors"
    if not source.is_file():
        pytest.skip(f"{name} parity fixtures not found in {source.parent}")
    path = tmp_path / f"{name}_checkpoint.safetensors"
    shutil.copy(source, path)
    words = source.parent / "dictionary.txt"
    if not words.is_file():  # CAN's own name for it
        words = source.parent / "words_dict.txt"
    shutil.copy(words, tmp_path / words.name)
    for other in FAMILIES:
        if other == name:
            continue
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))}: this is a {FAMILIES[name]} checkpoint .*, not a "
                                                  rf"{FAMILIES[other]} one: use `hmerzoo convert {name}`$"):
            convert(other, path, tmp_path / "out")
