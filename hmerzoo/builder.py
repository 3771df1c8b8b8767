"""``build_model`` and ``load_model``: recipe -> HMERModel, model directory -> HMERModel with weights.

Build order: vocabulary -> encoder -> neck -> decoder -> heads -> loss. Each stage's output size and the
vocabulary's size and special ids are injected into the next stages' constructors (only where the
constructor takes them); a recipe value that contradicts an injected one is an error.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Iterable

import torch

# the directory layout is checkpoint.py's (RECIPE_FILE, VOCAB_FILE, WEIGHTS_FILE stay importable from here)
from .checkpoint import (RECIPE_FILE, VOCAB_FILE, WEIGHTS_FILE, WEIGHTS_SUFFIX, find_model_dir, find_weights,
                         load_weights)
from .config import MODEL_OPTIONS, resolve_dictionary
from .errors import CheckpointError, DataError, RecipeError
from .model import HMERModel
from .recipe import load_recipe, validate_recipe
from .registry import DECODERS, ENCODERS, HEADS, LOSSES, MODELS, NECKS, Registry
from .vocab import Vocabulary

DEFAULT_LOSS = {"type": "cross_entropy"}


def build_component(reg: Registry, node: dict, path: str, injected: dict[str, Any] | None = None) -> Any:
    """Instantiate one recipe node: ``type`` picks the class, the other keys are keyword arguments.

    ``injected`` values are passed when the constructor takes them; a conflicting explicit value is an error.
    """
    cls = reg.get(node["type"], f"{path}.type")
    kwargs = {k: v for k, v in node.items() if k != "type"}
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    for name, value in (injected or {}).items():
        if name not in params:
            continue
        if name in kwargs and kwargs[name] != value:
            raise RecipeError(f"{path}.{name}: set to {kwargs[name]!r} but the model needs {value!r} here "
                              f"(it is derived from the other components); remove the key")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # constructors reject bad argument values with ValueError
        raise RecipeError(f"{path}: cannot build {node['type']}: {e}; fix the arguments under {path}") from None


def vocab_from_recipe(recipe: dict, captions: bool = True) -> Vocabulary:
    """``captions=False`` (a model type that trains on images alone): without a dictionary, the special tokens."""
    vcfg = recipe.get("vocab") or {}
    specials = vcfg.get("specials")
    if specials is None:  # an empty list is meaningful: the dictionary lists its special tokens itself (ABM)
        specials = ["<pad>", "<sos>", "<eos>"]
    # no vocab.dictionary: the data root's dictionary.txt, the root resolved as for training (data.root,
    # $HMERZOO_DATA, the checkout's data/crohme, the user cache)
    dictionary = resolve_dictionary(vcfg.get("dictionary"), (recipe.get("data") or {}).get("root"))
    if not captions and vcfg.get("dictionary") is None and not os.path.isfile(dictionary):
        return Vocabulary(specials or ["<pad>", "<sos>", "<eos>"], roles=vcfg.get("roles"))
    if vcfg.get("dictionary") is None and not os.path.isfile(dictionary):
        # HME100K, folder and InkML roots ship no dictionary.txt. Training reads one off all the labels (sorted,
        # so the ids do not depend on which splits were read) and passes it as `vocab`; a direct build does not
        # guess it
        root = os.path.dirname(dictionary)
        raise DataError(f"vocab.dictionary: not set, and the data root has no {os.path.basename(dictionary)} "
                        f"({dictionary}); write one from the captions with `hmerzoo data vocab {root} --out "
                        f"{dictionary}`, or set vocab.dictionary=FILE (hmerzoo train reads it from the labels of "
                        "such roots by itself)")
    return Vocabulary.from_dictionary(dictionary, specials, roles=vcfg.get("roles"))


def build_model(recipe: str | os.PathLike | dict, overrides: Iterable[str] = (), vocab: Vocabulary | None = None,
                validate: bool = True) -> HMERModel:
    """Build a model (randomly initialised) from a recipe path, a shipped recipe name or a recipe dict.

    ``vocab`` skips reading the dictionary (used when loading a saved model).
    """
    import hmerzoo.components  # noqa: F401  (registers the built-in components)

    source = None if isinstance(recipe, dict) else str(recipe)
    recipe = load_recipe(recipe, overrides)
    if validate:
        validate_recipe(recipe, source)
    model_cfg = recipe["model"]
    model_cls = MODELS.get(model_cfg["type"], "model.type") if model_cfg.get("type") else None
    if vocab is None:
        vocab = vocab_from_recipe(recipe, captions=getattr(model_cls, "captions", True))
    specials = dict(vocab_size=len(vocab), **vocab.special_ids)
    if model_cls is not None:
        return build_typed_model(model_cls, recipe, vocab, specials)

    encoder = build_component(ENCODERS, model_cfg["encoder"], "model.encoder")
    channels = _out_channels(encoder, "model.encoder")
    neck = None
    if model_cfg.get("neck"):
        neck = build_component(NECKS, model_cfg["neck"], "model.neck", {"in_channels": channels})
        channels = _out_channels(neck, "model.neck")
    decoder = build_component(DECODERS, model_cfg["decoder"], "model.decoder",
                              {"in_channels": channels, "vocab": vocab, **specials})
    d_model = getattr(decoder, "d_model", None)
    heads = {}
    for name, node in (model_cfg.get("heads") or {}).items():
        if node is None:
            continue  # a head switched off by an override (model.heads.NAME=null)
        # a head that takes `decoder` may plug into it (ICAL's fused output layer)
        heads[name] = build_component(HEADS, node, f"model.heads.{name}",
                                      {"d_model": d_model, "vocab": vocab, "decoder": decoder, **specials})
    loss = build_component(LOSSES, recipe.get("loss") or DEFAULT_LOSS, "loss", specials)
    return HMERModel(vocab, encoder, decoder, loss, neck=neck, heads=heads, recipe=recipe)


def build_typed_model(cls: Any, recipe: dict, vocab: Vocabulary, specials: dict) -> Any:
    """``model.type: NAME`` (MODELS): the encoder, the neck (when given) and the top-level ``loss`` are built as for
    HMERModel and passed with the vocabulary and the recipe; every other key of ``model:`` is the class's own
    keyword argument. The result keeps the trainer's contract: ``forward(batch) -> {"loss", "losses"}``, ``vocab``,
    ``recipe``, ``num_parameters``; ``greedy`` only if it is validated with ExpRate."""
    model_cfg = recipe["model"]
    encoder = build_component(ENCODERS, model_cfg["encoder"], "model.encoder")
    parts: dict[str, Any] = {"vocab": vocab, "encoder": encoder, "recipe": recipe}
    if model_cfg.get("neck"):
        parts["neck"] = build_component(NECKS, model_cfg["neck"], "model.neck",
                                        {"in_channels": _out_channels(encoder, "model.encoder")})
    if recipe.get("loss"):
        parts["loss"] = build_component(LOSSES, recipe["loss"], "loss", specials)
    own = {k: v for k, v in model_cfg.items() if k not in ("type", "encoder", "neck") and k not in MODEL_OPTIONS}
    try:
        return cls(**parts, **own)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"model: cannot build model.type={model_cfg['type']}: {e}") from None


def _out_channels(module: Any, path: str) -> int:
    ch = getattr(module, "out_channels", None)
    if not isinstance(ch, int):
        raise RecipeError(f"{path}: {type(module).__name__} must expose an integer attribute 'out_channels' "
                          "(the channels of its output), so the next component can be sized")
    return ch


# ---------------------------------------------------------------------------------------------------------------
def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu", weights: str | None = None) -> HMERModel:
    """Load a trained or converted model: its recipe, vocabulary and weights, in eval mode."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist")
    model_dir = find_model_dir(path if path.is_dir() else path.parent)
    weights_path = Path(weights) if weights else find_weights(path)
    if weights_path.suffix != WEIGHTS_SUFFIX:
        raise CheckpointError(f"{weights_path}: load_model reads .safetensors weights only; "
                              "use 'hmerzoo convert' for official checkpoints")
    vocab_path = model_dir / VOCAB_FILE
    if not vocab_path.is_file():
        raise CheckpointError(f"{model_dir}: {VOCAB_FILE} is missing; the model's vocabulary is stored there")
    vocab = Vocabulary.load(str(vocab_path))
    model = build_model(model_dir / RECIPE_FILE, vocab=vocab)
    state = load_weights(weights_path, device=map_location)
    load_state_dict_checked(model, state, str(weights_path))
    model.to(map_location)
    model.eval()
    return model


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict(strict) with a message that says which model the file does not belong to."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shape:
            k = shape[0]
            parts.append(f"{len(shape)} with other shapes (e.g. {k}: file {tuple(state[k].shape)} vs model "
                         f"{tuple(own[k].shape)})")
        raise CheckpointError(f"{where}: these weights belong to another model or vocabulary: "
                              + "; ".join(parts) + ". Load them with the recipe and vocabulary they were trained with")
    model.load_state_dict(state, strict=True)
