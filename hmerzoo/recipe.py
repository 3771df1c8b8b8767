"""YAML recipes: loading (``extends:`` with one parent), ``key.path=value`` overrides, validation.

A recipe is plain YAML read with ``yaml.safe_load``. Its top-level sections are fixed (see ``TOP_LEVEL``);
``model`` holds component nodes (``type:`` + constructor keyword arguments). Validation checks every key
against the dataclass of its section or the signature of its component and reports all problems at once.
"""
from __future__ import annotations

import copy
import inspect
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from . import config as C
from .errors import RecipeError, did_you_mean
from .registry import (DATASETS, DECODERS, ENCODERS, HEADS, LOSSES, MODELS, NECKS, OPTIMIZERS, SCHEDULERS, TRANSFORMS,
                       Registry, import_modules)

TOP_LEVEL = ["extends", "name", "description", "seed", "imports", "vocab", "data", "model", "loss", "optim",
             "sched", "train", "decode"]
MODEL_KEYS = ["type", "encoder", "neck", "decoder", "heads"]
# what the builder passes to a model.type class itself (builder.build_typed_model)
TYPED_MODEL_PARTS = {"vocab", "encoder", "neck", "loss", "recipe"}

# Constructor arguments the builder supplies; a recipe may set them only to the value that would be injected.
INJECTED = {
    "neck": {"in_channels"},
    "decoder": {"in_channels", "vocab_size", "pad_id", "sos_id", "eos_id"},
    "heads": {"d_model", "vocab_size", "pad_id", "sos_id", "eos_id", "vocab"},
    "loss": {"vocab_size", "pad_id", "sos_id", "eos_id"},
    "optim": {"params"},
    "sched": {"optimizer", "total_steps", "steps_per_epoch"},
}
# Keys of a component node the builder consumes itself (not constructor arguments).
NODE_KEYS = {"type"}


def recipes_dir() -> Path:
    """The folder of the recipes that ship with hmerzoo (``$HMERZOO_RECIPES`` overrides)."""
    env = os.environ.get("HMERZOO_RECIPES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "recipes"


def list_recipes() -> list[Path]:
    d = recipes_dir()
    return sorted(d.glob("*.yaml")) if d.is_dir() else []


def resolve_recipe_path(ref: str | os.PathLike, relative_to: Path | None = None) -> Path:
    """A path, a path relative to the including recipe, or the name of a shipped recipe ('bttr')."""
    p = Path(ref)
    candidates = [p]
    if relative_to is not None and not p.is_absolute():
        candidates.insert(0, relative_to / p)
    if p.suffix == "" and len(p.parts) == 1:
        candidates.append(recipes_dir() / f"{p}.yaml")
    for c in candidates:
        if c.is_file():
            return c
    names = [r.stem for r in list_recipes()]
    raise RecipeError(f"recipe '{ref}' not found (looked at {', '.join(str(c) for c in candidates)})"
                      f"{did_you_mean(p.stem, names)}; shipped recipes: {', '.join(names) or '(none)'}")


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"cannot read {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise RecipeError(f"{where}: invalid YAML: {e.problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    return data


def merge(base: dict, child: dict) -> dict:
    """Deep-merge ``child`` into a copy of ``base``: mappings merge, lists and scalars replace,
    and a component node whose ``type`` changes is replaced whole (its old arguments would not fit)."""
    out = copy.deepcopy(base)
    for k, v in child.items():
        if (isinstance(v, dict) and isinstance(out.get(k), dict)
                and not ("type" in v and v.get("type") != out[k].get("type"))):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_recipe(source: str | os.PathLike | dict, overrides: Iterable[str] = (), _seen: tuple = ()) -> dict:
    """Load a recipe (path, shipped name or dict), resolve ``extends``, apply overrides. Not yet validated."""
    if isinstance(source, dict):
        data, base_dir, where = copy.deepcopy(source), Path.cwd(), "<dict>"
    else:
        path = resolve_recipe_path(source)
        if path.resolve() in _seen:
            raise RecipeError(f"{path}: 'extends' forms a cycle ({' -> '.join(str(s) for s in _seen)})")
        data, base_dir, where = _read_yaml(path), path.parent, str(path)
        _seen = _seen + (path.resolve(),)
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise RecipeError(f"{where}: 'extends' takes one parent recipe (a path or name), got {parent!r}")
        base = load_recipe(resolve_recipe_path(parent, base_dir), (), _seen)
        data = merge(base, data)
    for ov in overrides:
        apply_override(data, ov)
    return data


def parse_override(text: str) -> tuple[list[str], Any, bool]:
    """'a.b=value' -> (['a', 'b'], parsed YAML value, False); '~a.b' -> (['a', 'b'], None, True)."""
    if text.startswith("~"):
        return text[1:].split("."), None, True
    if "=" not in text:
        raise RecipeError(f"override '{text}': expected key.path=value (or ~key.path to delete a key)")
    key, _, raw = text.partition("=")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML: take it as a plain string
    return key.strip().split("."), value, False


def apply_override(data: dict, text: str) -> None:
    keys, value, delete = parse_override(text)
    node = data
    for i, k in enumerate(keys[:-1]):
        nxt = node.get(k)
        if nxt is None:
            if k not in node and i == 0 and k not in TOP_LEVEL:
                raise RecipeError(f"override '{text}': unknown section '{k}'{did_you_mean(k, TOP_LEVEL)}")
            nxt = node[k] = {}
        if not isinstance(nxt, dict):
            raise RecipeError(f"override '{text}': '{'.'.join(keys[:i + 1])}' is {nxt!r}, not a mapping")
        node = nxt
    last = keys[-1]
    if delete:
        if last not in node:
            raise RecipeError(f"override '{text}': there is no key '{'.'.join(keys)}' to delete"
                              f"{did_you_mean(last, list(node))}")
        del node[last]
        return
    if len(keys) == 1 and last not in TOP_LEVEL:
        raise RecipeError(f"override '{text}': unknown section '{last}'{did_you_mean(last, TOP_LEVEL)}")
    if isinstance(value, dict) and isinstance(node.get(last), dict) and value.get("type", node[last].get("type")) == node[last].get("type"):
        node[last] = merge(node[last], value)
    else:
        node[last] = value


# ---------------------------------------------------------------------------------------------------------------
# validation
def component_slots(recipe: dict) -> list[tuple[str, Registry, str, Any]]:
    """(key path, registry, injected-group, node) for every component node of a recipe."""
    model = recipe.get("model") or {}
    slots = []
    if isinstance(model, dict):
        for key, reg in (("encoder", ENCODERS), ("neck", NECKS), ("decoder", DECODERS)):
            if model.get(key) is not None:
                slots.append((f"model.{key}", reg, key, model[key]))
        heads = model.get("heads") or {}
        if isinstance(heads, dict):
            for name, node in heads.items():
                if node is not None:
                    slots.append((f"model.heads.{name}", HEADS, "heads", node))
    for key, reg in (("loss", LOSSES), ("optim", OPTIMIZERS), ("sched", SCHEDULERS)):
        if recipe.get(key) is not None:
            slots.append((key, reg, key, recipe[key]))
    data = recipe.get("data")
    if isinstance(data, dict):
        for key in ("augment", "transforms"):
            if isinstance(data.get(key), list):
                for i, node in enumerate(data[key]):
                    node = {"type": node} if isinstance(node, str) else node  # a bare name: no arguments
                    slots.append((f"data.{key}[{i}]", TRANSFORMS, key, node))
    return slots


def signature_problems(obj: Any, kwargs: dict, path: str, injected: set[str]) -> list[str]:
    """Check recipe kwargs against a constructor's signature: unknown keys, wrong types, missing arguments."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return []
    params = sig.parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    try:
        hints = _safe_hints(obj)
    except Exception:
        hints = {}
    problems = []
    for key, val in kwargs.items():
        if key not in params:
            if not takes_kwargs:
                problems.append(f"{path}.{key}: unknown argument of {_qual(obj)}{did_you_mean(key, named)}; "
                                f"it takes: {', '.join(n for n in named if n not in injected) or '(nothing)'}")
            continue
        p = C.type_problem(val, hints.get(key, params[key].annotation), f"{path}.{key}")
        if p:
            problems.append(p)
    for n, p in params.items():
        if (p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty
                and n not in kwargs and n not in injected):
            problems.append(f"{path}.{n}: required argument of {_qual(obj)} is missing")
    return problems


def _safe_hints(obj: Any) -> dict:
    import typing

    target = obj.__init__ if inspect.isclass(obj) else obj
    return typing.get_type_hints(target)


def _qual(obj: Any) -> str:
    return getattr(obj, "__qualname__", repr(obj))


def validate_recipe(recipe: dict, source: str | None = None) -> None:
    """Raise one :class:`RecipeError` listing every problem of the recipe, or return None."""
    problems: list[str] = []
    for key in recipe:
        if key not in TOP_LEVEL:
            problems.append(f"{key}: unknown section{did_you_mean(key, TOP_LEVEL)}; sections: {', '.join(TOP_LEVEL)}")
    if recipe.get("imports") is not None and not isinstance(recipe["imports"], list):
        problems.append("imports: expected a list of module names")
    else:
        import_modules(recipe.get("imports"))
    if recipe.get("seed") is not None and C.type_problem(recipe["seed"], int, "seed"):
        problems.append(C.type_problem(recipe["seed"], int, "seed"))
    for section, cls in C.SECTIONS.items():
        problems += C.check_section(cls, recipe.get(section), section)
    model = recipe.get("model")
    if not isinstance(model, dict):
        problems.append("model: missing; a recipe needs model.encoder and model.decoder")
    else:
        problems += _model_problems(model)
        if model.get("heads") is not None and not isinstance(model["heads"], dict):
            problems.append("model.heads: expected a mapping of head name -> {type: ..., ...}")
    if recipe.get("optim") is None:
        problems.append("optim: missing (e.g. optim: {type: adadelta, lr: 1.0})")
    for path, reg, group, node in component_slots(recipe):
        if not isinstance(node, dict):
            problems.append(f"{path}: expected a mapping with a 'type' key, got {node!r}")
            continue
        if "type" not in node:
            problems.append(f"{path}.type: missing; registered {reg.kind}s: {', '.join(reg.names())}")
            continue
        try:
            obj = reg.get(node["type"], f"{path}.type")
        except RecipeError as e:
            problems.extend(e.problems)
            continue
        kwargs = {k: v for k, v in node.items() if k not in NODE_KEYS}
        problems += signature_problems(obj, kwargs, path, INJECTED.get(group, set()))
    dataset = recipe["data"].get("dataset") if isinstance(recipe.get("data"), dict) else None
    if isinstance(dataset, str):
        try:
            DATASETS.get(dataset, "data.dataset")
        except RecipeError as e:
            problems.extend(e.problems)
    fmt = recipe["data"].get("format") if isinstance(recipe.get("data"), dict) else None
    if isinstance(fmt, str) and fmt != "auto":
        try:
            DATASETS.get(fmt, "data.format")
        except RecipeError as e:
            problems.extend(e.problems)
    if problems:
        raise RecipeError(problems, source)


def _model_problems(model: dict) -> list[str]:
    """The ``model:`` keys that are not component nodes: model.type's own arguments, init_from/freeze options."""
    problems: list[str] = []
    typed = None
    if model.get("type") is not None:
        try:
            typed = MODELS.get(model["type"], "model.type")
        except RecipeError as e:
            return list(e.problems)
    own = {}
    for key in model:
        if key in C.MODEL_OPTIONS:
            problem = C.type_problem(model[key], C.MODEL_OPTIONS[key], f"model.{key}")
            problems += [problem] if problem else []
        elif typed is not None and key not in ("type", "encoder", "neck"):
            own[key] = model[key]
        elif key not in MODEL_KEYS:
            known = MODEL_KEYS + list(C.MODEL_OPTIONS)
            problems.append(f"model.{key}: unknown key{did_you_mean(key, known)}; known: {', '.join(known)}")
    if typed is not None:
        problems += signature_problems(typed, own, "model", TYPED_MODEL_PARTS)
    for key in ("encoder",) if typed is not None else ("encoder", "decoder"):
        if not model.get(key):
            problems.append(f"model.{key}: missing")
    return problems


def dump_recipe(recipe: dict) -> str:
    return yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
