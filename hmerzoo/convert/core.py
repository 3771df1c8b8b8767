"""What every converter shares: reading official files safely, renaming keys, completing the recipe, and
:func:`convert`, which checks the result against a freshly built hmerzoo model and writes the model directory.

The families themselves (which keys, which vocabulary, which architecture) live in one module each beside this one.
"""
from __future__ import annotations

import copy
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..builder import build_model, load_state_dict_checked
from ..checkpoint import RECIPE_FILE, VOCAB_FILE, WEIGHTS_FILE, atomic_write_text, save_weights
from ..errors import CheckpointError, HmerzooError
from ..recipe import dump_recipe, load_recipe, recipes_dir, validate_recipe
from ..registry import CONVERTERS
from ..vocab import Vocabulary

DICTIONARY_FILE = "dictionary.txt"
CAN_WORDS_FILE = "words_dict.txt"  # CAN's name for its vocabulary file


@dataclass
class Converted:
    """What a converter produces: a complete recipe, the vocabulary and the state dict in hmerzoo's key names."""

    recipe: dict
    vocab: Vocabulary
    state: dict[str, torch.Tensor]


class Converter:
    """One official implementation's checkpoints; subclasses register in ``CONVERTERS`` under the name that
    ``hmerzoo convert NAME`` takes.

    ``recognises`` looks only at the key names, so that a checkpoint handed to the wrong converter is named for
    what it is instead of failing somewhere in the renaming.
    """

    family = ""  # the official system's name, as messages say it ("CoMER")
    keys = ""  # what its keys look like, for messages

    def recognises(self, state: dict[str, torch.Tensor]) -> bool:
        raise NotImplementedError

    def convert(self, state: dict[str, torch.Tensor], dictionary: Path, hparams: dict) -> Converted:
        """Vocabulary, renamed state dict and recipe (architecture read off the tensor shapes)."""
        raise NotImplementedError


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
    if state is obj and isinstance(obj.get("model"), dict):
        state = obj["model"]  # CAN's save_checkpoint: {'model': state_dict} (and maybe 'optimizer')
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
    if not d.is_file() and (official_path.parent / CAN_WORDS_FILE).is_file():
        d = official_path.parent / CAN_WORDS_FILE
    if not d.is_file():
        raise CheckpointError(f"{official_path}: no {DICTIONARY_FILE} beside it; pass the vocabulary file the model "
                              "was trained with (--dictionary PATH, e.g. the official repo's "
                              "bttr/datamodule/dictionary.txt)")
    return d


# ---------------------------------------------------------------------------------------------------------------
# which family a state dict belongs to
def families_of(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the registered converters whose official key layout ``state`` has."""
    return [name for name, cls in CONVERTERS.items() if cls().recognises(state)]


def check_family(name: str, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """Refuse a checkpoint of another family (naming it, and the converter to use), or of no known family."""
    converter = CONVERTERS.get(name)()
    if converter.recognises(state):
        return
    others = families_of(state)
    if others:
        other = CONVERTERS.get(others[0])()
        raise CheckpointError(f"{source}: this is a {other.family} checkpoint ({other.keys}), not a "
                              f"{converter.family} one: use `hmerzoo convert {others[0]}`")
    known = "; ".join(f"{n} ({cls().keys})" for n, cls in CONVERTERS.items())
    raise CheckpointError(f"{source}: its keys ({', '.join(list(state)[:3])}, ...) belong to no model hmerzoo "
                          f"converts: {known}. Is it an official checkpoint of one of these?")


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


def has_prefix(state: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


def strip_prefix(state: dict[str, torch.Tensor], prefix: str, first_keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Remove the LightningModule's attribute prefix (``bttr.``); accept state dicts of the inner module too."""
    if has_prefix(state, prefix):
        return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    if any(k.startswith(first_keys) for k in state):
        return dict(state)
    raise CheckpointError(f"no key starts with '{prefix}' (or {', '.join(first_keys)}); the first keys are "
                          f"{', '.join(list(state)[:3])}. Is this the right model?")


def require(state: dict[str, torch.Tensor], key: str, model: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"the checkpoint has no '{key}'; it is not an official {model} checkpoint")
    return state[key]


def count_indexed(state: dict[str, torch.Tensor], prefix: str) -> int:
    """How many ``prefix<i>.`` modules the state dict has (the highest index + 1)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def densenet_section(state: dict[str, torch.Tensor], prefix: str, model: str) -> dict:
    """The ``densenet`` encoder node of a DenseNet under ``prefix`` (all four families use the same one), its
    sizes read off the tensors; dropout is the official 0.2 (no checkpoint records it)."""
    stem = require(state, f"{prefix}conv1.weight", model)
    num_layers = count_indexed(state, f"{prefix}dense1.")
    if not num_layers:
        raise CheckpointError(f"the checkpoint has no dense-block layers; it is not an official {model} checkpoint")
    trans1 = require(state, f"{prefix}trans1.conv1.weight", model)
    reduction = float(trans1.shape[0]) / float(trans1.shape[1])
    return {"type": "densenet", "growth_rate": int(stem.shape[0]) // 2, "num_layers": num_layers,
            "reduction": 0.5 if abs(reduction - 0.5) < 0.01 else round(reduction, 4), "dropout": 0.2,
            "stem_norm": f"{prefix}norm1.weight" in state, "post_norm": f"{prefix}post_norm.weight" in state}


def complete_recipe(name: str, model_section: dict, fallback: dict) -> dict:
    """The shipped recipe ``name`` (training sections included) with the checkpoint's ``model`` section.

    Falls back to ``fallback`` + the model section, with a warning, when hmerzoo ships no such recipe or it does
    not validate (a converted model must load even if, say, a scheduler it names is unavailable).
    """
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
def convert(name: str, official_path: str | os.PathLike, out_dir: str | os.PathLike,
            dictionary: str | os.PathLike | None = None) -> Path:
    """Convert an official checkpoint of model ``name`` into the hmerzoo model directory ``out_dir``.

    ``dictionary``: the official vocabulary file; default: ``dictionary.txt`` beside the checkpoint.
    Returns ``out_dir``; ``hmerzoo.load_model(out_dir)`` loads the result.
    """
    if name not in CONVERTERS:
        raise CheckpointError(f"no converter for '{name}'; converters: {', '.join(CONVERTERS.names())}")
    official_path = Path(official_path)
    official_state, hparams = read_official_checkpoint(official_path)
    check_family(name, official_state, official_path)
    dictionary_path = find_dictionary(official_path, dictionary)
    try:
        converted = CONVERTERS.get(name)().convert(official_state, dictionary_path, hparams)
    except CheckpointError as e:  # the converter speaks of "the checkpoint": say which file
        raise CheckpointError(f"{official_path}: {e}") from None
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

    # Each file is written atomically; the weights go last, so a directory with weights is a complete one.
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / RECIPE_FILE, dump_recipe(converted.recipe))
    converted.vocab.save(str(out / VOCAB_FILE))  # written through a temporary file too
    save_weights(out / WEIGHTS_FILE, state, {"converted_from": name, "source": official_path.name})
    return out
