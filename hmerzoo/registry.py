"""Component registries.

One :class:`Registry` per slot of a recipe (encoders, necks, decoders, heads, losses, optimizers, schedulers,
datasets, transforms), and one for the official checkpoint formats ``hmerzoo convert`` reads (converters).
Components register themselves where they are defined::

    from hmerzoo.registry import DECODERS

    @DECODERS.register("my_decoder")
    class MyDecoder(nn.Module): ...

A recipe then names them with ``type: my_decoder``. Code outside the package is found through the recipe's
``imports: [my_pkg.my_mod]``, the CLI's ``--import my_pkg.my_mod``, or a dotted ``type: my_pkg.my_mod:MyClass``.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator

from .errors import RecipeError, did_you_mean

HOW_TO_ADD = (
    "to add your own, decorate it with @{reg}.register('name') (from hmerzoo.registry import {reg}) and import its "
    "module: recipe 'imports: [my_pkg.my_mod]', CLI '--import my_pkg.my_mod', or write 'type: my_pkg.my_mod:MyClass'"
)


class Registry:
    """A name -> class (or factory function) table for one kind of component."""

    def __init__(self, kind: str, var_name: str):
        self.kind = kind  # e.g. "decoder"
        self.var_name = var_name  # e.g. "DECODERS", used in help messages
        self._entries: dict[str, Any] = {}

    def register(self, name: str | None = None, *, override: bool = False) -> Callable[[Any], Any]:
        """Decorator: ``@REG.register("name")``. A name registered twice raises unless ``override=True``."""

        def deco(obj: Any) -> Any:
            key = name or obj.__name__
            if key in self._entries and not override and self._entries[key] is not obj:
                prev = self._entries[key]
                raise KeyError(
                    f"{self.kind} '{key}' is already registered (by {prev.__module__}.{prev.__qualname__}); "
                    f"pass override=True to {self.var_name}.register to replace it"
                )
            self._entries[key] = obj
            return obj

        return deco

    def add(self, name: str, obj: Any, *, override: bool = False) -> Any:
        """Register ``obj`` under ``name`` without a decorator (for third-party classes)."""
        return self.register(name, override=override)(obj)

    def get(self, name: str, key_path: str | None = None) -> Any:
        """Look a component up by registered name or by ``module.path:Attr``.

        Unknown names raise :class:`RecipeError` naming the recipe key, the closest names, all names,
        and how to register a new one.
        """
        if not isinstance(name, str):
            raise RecipeError(f"{key_path or self.kind}: 'type' must be a string, got {type(name).__name__}")
        if name in self._entries:
            return self._entries[name]
        where = f"{key_path}: " if key_path else ""
        if ":" in name:
            mod_name, _, attr = name.partition(":")
            try:
                mod = importlib.import_module(mod_name)
            except ImportError as e:
                raise RecipeError(f"{where}cannot import module '{mod_name}' for {self.kind} '{name}': {e}") from None
            try:
                return getattr(mod, attr)
            except AttributeError:
                raise RecipeError(
                    f"{where}module '{mod_name}' has no attribute '{attr}'"
                    + did_you_mean(attr, [a for a in dir(mod) if not a.startswith("_")])
                ) from None
        names = sorted(self._entries)
        raise RecipeError(
            f"{where}unknown {self.kind} '{name}'{did_you_mean(name, names)}. "
            f"Registered {self.kind}s: {', '.join(names) or '(none)'}. " + HOW_TO_ADD.format(reg=self.var_name)
        )

    def names(self) -> list[str]:
        return sorted(self._entries)

    def items(self) -> Iterator[tuple[str, Any]]:
        return iter(sorted(self._entries.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self.names())})"


ENCODERS = Registry("encoder", "ENCODERS")
NECKS = Registry("neck", "NECKS")
DECODERS = Registry("decoder", "DECODERS")
HEADS = Registry("head", "HEADS")
LOSSES = Registry("loss", "LOSSES")
OPTIMIZERS = Registry("optimizer", "OPTIMIZERS")
SCHEDULERS = Registry("scheduler", "SCHEDULERS")
DATASETS = Registry("dataset", "DATASETS")
TRANSFORMS = Registry("transform", "TRANSFORMS")
# official checkpoint formats ``hmerzoo convert NAME`` reads; filled by the modules of hmerzoo.convert
CONVERTERS = Registry("converter", "CONVERTERS")
SEARCH_MODES = Registry("search mode", "SEARCH_MODES")  # decode.mode: hmerzoo.decoding.modes
# model.type: composite models other than the default encoder (+ neck) + decoder HMERModel (builder.build_model)
MODELS = Registry("model", "MODELS")

ALL = {
    "encoders": ENCODERS,
    "necks": NECKS,
    "decoders": DECODERS,
    "heads": HEADS,
    "losses": LOSSES,
    "optimizers": OPTIMIZERS,
    "schedulers": SCHEDULERS,
    "datasets": DATASETS,
    "transforms": TRANSFORMS,
    "converters": CONVERTERS,
    "search_modes": SEARCH_MODES,
    "models": MODELS,
}


def import_modules(modules: list[str] | None, key_path: str = "imports") -> None:
    """Import user modules so their ``@register`` decorators run. The current directory is searched too,
    as ``python -m`` would, so a module next to the recipe's working directory needs no install."""
    import os
    import sys

    if modules and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    for i, mod in enumerate(modules or []):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise RecipeError(
                f"{key_path}[{i}]: cannot import '{mod}': {e}. The module must be importable "
                "(installed, or its folder on PYTHONPATH / the current directory)"
            ) from None
