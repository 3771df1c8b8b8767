"""Official checkpoints -> hmerzoo model directories (``recipe.yaml``, ``vocab.json``, ``model.safetensors``).

    from hmerzoo.convert import convert
    convert("bttr", "epoch=...ckpt", "models/bttr")          # dictionary.txt beside the checkpoint
    model = hmerzoo.load_model("models/bttr")

Each converter is a function ``(official_state, dictionary_path, hparams) -> Converted`` registered in
:data:`CONVERTERS`; it builds the vocabulary the official code builds, renames the official keys to hmerzoo's and
derives the architecture from the tensor shapes. :func:`convert` does the rest for every model: reading the file
safely, checking the result against a freshly built hmerzoo model, and writing the directory atomically.
To add a model: write ``convert_<name>`` next to :func:`convert_bttr` and add it to ``CONVERTERS``.
"""
from __future__ import annotations

import copy
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .errors import CheckpointError, HmerzooError
from .vocab import Vocabulary

DICTIONARY_FILE = "dictionary.txt"


@dataclass
class Converted:
    """What a converter produces: a complete recipe, the vocabulary and the state dict in hmerzoo's key names."""

    recipe: dict
    vocab: Vocabulary
    state: dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# reading official files
def read_official_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, hyper-parameters or {}) of an official checkpoint.

    ``.safetensors``: the tensors, keys as in the official checkpoint. Anything else (Lightning ``.ckpt``,
    ``.pt``, ``.pkl``) is read with ``torch.load(weights_only=True)``, which cannot run code from the file; a
    Lightning checkpoint's ``state_dict`` is taken, a plain state dict is used as it is.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path)), {}
        except Exception as e:  # safetensors has its own error types for corrupt files
            raise CheckpointError(f"{path}: cannot read it as safetensors ({e})") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Never retry with weights_only=False: unpickling arbitrary objects runs code from the file.
        raise CheckpointError(
            f"{path}: refused to load it safely: torch.load(weights_only=True) stopped at an object that is not "
            f"plain tensors/containers ({_first_line(e)}). hmerzoo does not unpickle arbitrary objects, since that "
            "can run code from the file. To proceed, in an environment you trust (e.g. with the official code "
            "installed) re-save only the weights: torch.save(torch.load(path, weights_only=False)['state_dict'], "
            "'weights.pt'), or save that state dict with safetensors.torch.save_file, and convert that file"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read it with torch.load ({_first_line(e)}); is it a PyTorch "
                              "checkpoint?") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict or a state dict, got {type(obj).__name__}")
    hparams = obj.get("hyper_parameters") if isinstance(obj.get("hyper_parameters"), dict) else {}
    state = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: holds no tensors (keys: {', '.join(map(str, list(state)[:8]))}); expected a "
                              "Lightning checkpoint with a 'state_dict' or a plain state dict")
    return tensors, dict(hparams)


def _first_line(e: BaseException) -> str:
    """The informative part of an exception message, on one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch colours parts of its message
    # torch's weights_only message is long; the unpickler's own line says which global was refused
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\.?$)", text, flags=re.MULTILINE)
    if match:
        return match.group(1).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:2]) if lines else type(e).__name__


def find_dictionary(official_path: Path, dictionary: str | os.PathLike | None) -> Path:
    if dictionary is not None:
        d = Path(dictionary)
        if not d.is_file():
            raise CheckpointError(f"dictionary {d}: no such file")
        return d
    d = official_path.parent / DICTIONARY_FILE
    if not d.is_file():
        raise CheckpointError(f"{official_path}: no {DICTIONARY_FILE} beside it; pass the vocabulary file the model "
                              "was trained with (--dictionary PATH, e.g. the official repo's "
                              "bttr/datamodule/dictionary.txt)")
    return d


# ---------------------------------------------------------------------------------------------------------------
# helpers shared by converters
def rename_keys(state: dict[str, torch.Tensor], prefixes: list[tuple[str, str]], model: str) -> dict[str, torch.Tensor]:
    """Rename every key by the first (official prefix -> hmerzoo prefix) that matches; unknown keys are an error."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        for old, new in prefixes:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"{len(unknown)} keys of the checkpoint are not part of an official {model} model "
                              f"(e.g. {', '.join(unknown[:3])}); is this a {model} checkpoint?")
    return out


def strip_prefix(state: dict[str, torch.Tensor], prefix: str, first_keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Remove the LightningModule's attribute prefix (``bttr.``); accept state dicts of the inner module too."""
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    if any(k.startswith(first_keys) for k in state):
        return dict(state)
    raise CheckpointError(f"no key starts with '{prefix}' (or {', '.join(first_keys)}); the first keys are "
                          f"{', '.join(list(state)[:3])}. Is this the right model?")


def _require(state: dict[str, torch.Tensor], key: str, model: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"the checkpoint has no '{key}'; it is not an official {model} checkpoint")
    return state[key]


def _count_indexed(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def complete_recipe(name: str, model_section: dict, fallback: dict) -> dict:
    """The shipped recipe ``name`` (training sections included) with the checkpoint's ``model`` section.

    Falls back to ``fallback`` + the model section, with a warning, when hmerzoo ships no such recipe or it does
    not validate (a converted model must load even if, say, a scheduler it names is unavailable).
    """
    from .recipe import load_recipe, recipes_dir, validate_recipe

    recipe = None
    if (recipes_dir() / f"{name}.yaml").is_file():
        try:
            recipe = load_recipe(name)
            recipe["model"] = model_section
            validate_recipe(recipe, f"{name} (shipped)")
        except HmerzooError as e:
            warnings.warn(f"convert: the shipped recipe '{name}' is not usable ({e}); writing a recipe with the "
                          "model and optimizer sections only", stacklevel=3)
            recipe = None
    if recipe is None:
        fallback = copy.deepcopy(fallback)
        recipe = {"name": fallback.pop("name", name), "model": model_section, **fallback}
    return recipe


def check_vocab_size(vocab: Vocabulary, classes: int, dictionary: Path, model: str) -> None:
    if len(vocab) != classes:
        raise CheckpointError(f"dictionary {dictionary}: gives {len(vocab)} tokens with the special tokens, but the "
                              f"{model} checkpoint has {classes} output classes; pass the dictionary the model was "
                              "trained with (--dictionary PATH)")


# ---------------------------------------------------------------------------------------------------------------
# BTTR (Green-Wood/BTTR, LitBTTR checkpoints: keys 'bttr.encoder.*', 'bttr.decoder.*')
BTTR_PREFIXES = [
    ("encoder.model.", "encoder."),
    ("encoder.feature_proj.0.", "neck.feature_proj."),
    ("encoder.norm.", "neck.norm."),
    ("decoder.word_embed.0.", "decoder.word_embed."),
    ("decoder.word_embed.1.", "decoder.embed_norm."),
    ("decoder.pos_enc.", "decoder.pos_enc."),
    ("decoder.model.layers.", "decoder.layers."),
    ("decoder.proj.", "decoder.proj."),
]

BTTR_OPTIM = {"type": "adadelta", "lr": 1.0, "eps": 1.0e-6, "weight_decay": 1.0e-4}


def convert_state_dict_bttr(official_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official BTTR state dict (with or without the ``bttr.`` prefix) -> hmerzoo state dict (same tensors)."""
    state = strip_prefix(official_state, "bttr.", ("encoder.", "decoder."))
    return rename_keys(state, BTTR_PREFIXES, "BTTR")


def bttr_model_section(official_state: dict[str, torch.Tensor], hparams: dict | None = None) -> dict:
    """hmerzoo ``model:`` section of a BTTR checkpoint, sizes read off the tensors (nhead/dropout from the
    checkpoint's hyper-parameters when it has them, else the official config's 8 / 0.3)."""
    hparams = hparams or {}
    state = strip_prefix(official_state, "bttr.", ("encoder.", "decoder."))
    stem = _require(state, "encoder.model.conv1.weight", "BTTR")
    d_model = int(_require(state, "encoder.feature_proj.0.weight", "BTTR").shape[0])
    num_layers = _count_indexed(state, "encoder.model.dense1.")
    decoder_layers = _count_indexed(state, "decoder.model.layers.")
    if not num_layers or not decoder_layers:
        raise CheckpointError("the checkpoint has no dense-block or decoder layers; it is not a BTTR checkpoint")
    ffn = int(_require(state, "decoder.model.layers.0.linear1.weight", "BTTR").shape[0])
    trans1 = _require(state, "encoder.model.trans1.conv1.weight", "BTTR")
    reduction = float(trans1.shape[0]) / float(trans1.shape[1])
    return {
        "encoder": {"type": "densenet", "growth_rate": int(stem.shape[0]) // 2, "num_layers": num_layers,
                    "reduction": 0.5 if abs(reduction - 0.5) < 0.01 else round(reduction, 4), "dropout": 0.2,
                    "stem_norm": "encoder.model.norm1.weight" in state,
                    "post_norm": "encoder.model.post_norm.weight" in state},
        "neck": {"type": "bttr_projection", "d_model": d_model},
        "decoder": {"type": "bttr", "d_model": d_model, "nhead": int(hparams.get("nhead", 8)),
                    "num_layers": decoder_layers, "dim_feedforward": ffn,
                    "dropout": float(hparams.get("dropout", 0.3)),
                    "max_positions": int(_require(state, "decoder.pos_enc.pe", "BTTR").shape[0])},
    }


def convert_bttr(official_state: dict[str, torch.Tensor], dictionary: Path, hparams: dict | None = None) -> Converted:
    # BTTR's vocabulary: <pad>=0, <sos>=1, <eos>=2, then dictionary.txt in file order (bttr/datamodule/vocab.py)
    vocab = Vocabulary.from_dictionary(str(dictionary), ["<pad>", "<sos>", "<eos>"])
    state = convert_state_dict_bttr(official_state)
    check_vocab_size(vocab, int(_require(state, "decoder.proj.weight", "BTTR").shape[0]), dictionary, "BTTR")
    # the weights define the architecture, so the model section always comes from the checkpoint
    recipe = complete_recipe("bttr", bttr_model_section(official_state, hparams),
                             fallback={"name": "bttr", "optim": dict(BTTR_OPTIM)})
    return Converted(recipe=recipe, vocab=vocab, state=state)


# name -> converter. CoMER, HMER-MTL and ABM are added here the same way.
CONVERTERS: dict[str, Callable[[dict[str, torch.Tensor], Path, dict], Converted]] = {
    "bttr": convert_bttr,
}


# ---------------------------------------------------------------------------------------------------------------
def convert(name: str, official_path: str | os.PathLike, out_dir: str | os.PathLike,
            dictionary: str | os.PathLike | None = None) -> Path:
    """Convert an official checkpoint of model ``name`` into the hmerzoo model directory ``out_dir``.

    ``dictionary``: the official vocabulary file; default: ``dictionary.txt`` beside the checkpoint.
    Returns ``out_dir``; ``hmerzoo.load_model(out_dir)`` loads the result.
    """
    from .builder import RECIPE_FILE, VOCAB_FILE, WEIGHTS_FILE, build_model, load_state_dict_checked
    from .checkpoint import atomic_write_text, save_weights
    from .recipe import dump_recipe

    if name not in CONVERTERS:
        raise CheckpointError(f"no converter for '{name}'; converters: {', '.join(sorted(CONVERTERS))}")
    official_path = Path(official_path)
    official_state, hparams = read_official_checkpoint(official_path)
    dictionary_path = find_dictionary(official_path, dictionary)
    converted = CONVERTERS[name](official_state, dictionary_path, hparams)
    converted.recipe.setdefault("description", f"converted from the official {name} checkpoint "
                                               f"{official_path.name} by hmerzoo.convert")

    # Build the hmerzoo model and load the converted tensors into it: this checks every key and shape before
    # anything is written.
    try:
        model = build_model(converted.recipe, vocab=converted.vocab)
    except HmerzooError as e:
        raise CheckpointError(f"{official_path}: the recipe derived from the checkpoint does not build: {e}") from None
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in converted.state.items()}
    own = model.state_dict()
    for k, v in state.items():
        if k in own and v.is_floating_point() and own[k].is_floating_point():
            state[k] = v.to(own[k].dtype)
    load_state_dict_checked(model, state, str(official_path))

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RECIPE_FILE, dump_recipe(converted.recipe))
    converted.vocab.save(str(out / VOCAB_FILE))
    save_weights(out / WEIGHTS_FILE, state, {"converted_from": name, "source": official_path.name})
    return out


__all__ = ["CONVERTERS", "Converted", "convert", "convert_bttr", "convert_state_dict_bttr", "bttr_model_section",
           "read_official_checkpoint"]
