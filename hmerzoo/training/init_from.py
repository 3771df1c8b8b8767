"""Starting a run from other weights, freezing parts of it, and telling step-aware modules the step.

- ``model.init_from: PATH`` (a run directory, a model directory or a ``.safetensors`` file): before the first step,
  every tensor of the file whose name and shape match one of the new model's is copied in; the rest keep their
  fresh initialisation. A table says what was loaded, what the model has that the file lacks (missing), what the
  file has that the model lacks (unexpected) and what has another shape. Nothing matching is an error.
- ``model.init_from_modules: [encoder, ...]``: only tensors under these module names (``encoder``,
  ``neck.scorer``, ...) are taken from the file (ignored when ``model.init_from`` is null: a recipe that names both
  trains from scratch with ``model.init_from=null``).
- ``model.freeze: [encoder, ...]``: these modules get no gradient and run in eval mode (BatchNorm statistics and
  dropout fixed, the usual way to keep a pre-trained feature extractor as it is) until optimizer step
  ``train.unfreeze_at`` (never when unset). Whether a module is frozen is decided from the trainer's step before
  every forward pass, so a resumed run freezes and releases exactly where a straight run does. The optimizer holds
  every parameter from the start; torch's optimizers leave parameters without a gradient untouched (no update, no
  weight decay, no state), so releasing them needs no new optimizer.
- Step-aware modules: any submodule with a ``set_training_step(step)`` method is told the number of optimizer steps
  completed before each training forward (curricula counted in optimizer steps, e.g. Mask & Match's masking ratio),
  read from the trainer state, so it too resumes exactly.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..checkpoint import find_weights, load_weights
from ..errors import CheckpointError, RecipeError

SHOWN = 6  # names listed per category under the table


@dataclasses.dataclass
class InitReport:
    """What ``init_from`` did: keys loaded, skipped and why."""

    source: Path
    loaded: list[str]
    missing: list[str]  # in the model (and the selected modules), not in the file
    unexpected: list[str]  # in the file (and the selected modules), not in the model
    mismatched: list[tuple[str, tuple, tuple]]  # (key, file shape, model shape)
    not_selected: list[str]  # in both, but outside model.init_from_modules


def _in_modules(key: str, modules: Sequence[str] | None) -> bool:
    return modules is None or any(key == m or key.startswith(m + ".") for m in modules)


def load_matching(model: nn.Module, path: str | Path, modules: Sequence[str] | None = None) -> InitReport:
    """Copy the tensors of ``path`` whose names and shapes match ``model``'s into it (restricted to ``modules``)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"model.init_from: {path} does not exist (a run directory, a model directory or a "
                              ".safetensors file)")
    weights_path = find_weights(path)
    if weights_path.suffix != ".safetensors":
        raise CheckpointError(f"model.init_from: {weights_path}: only .safetensors weights are read; convert "
                              "official checkpoints with 'hmerzoo convert' first")
    state = load_weights(weights_path)
    own = model.state_dict()
    if modules is not None:
        names = sorted({k.split(".")[0] for k in own})
        for m in modules:
            if not any(_in_modules(k, [m]) for k in own):
                raise RecipeError(f"model.init_from_modules: the model has no module '{m}' with weights; its "
                                  f"modules: {', '.join(names)}")
    loaded, missing, mismatched, not_selected = [], [], [], []
    for key, value in own.items():
        if key not in state:
            if _in_modules(key, modules):
                missing.append(key)
        elif not _in_modules(key, modules):
            not_selected.append(key)
        elif tuple(state[key].shape) != tuple(value.shape):
            mismatched.append((key, tuple(state[key].shape), tuple(value.shape)))
        else:
            loaded.append(key)
    unexpected = [k for k in state if k not in own and _in_modules(k, modules)]
    report = InitReport(weights_path, loaded, missing, unexpected, mismatched, not_selected)
    if not loaded:
        where = f" under {', '.join(modules)}" if modules is not None else ""
        example = next(iter(state), "(empty file)")
        raise CheckpointError(f"model.init_from: {weights_path}: no tensor of this file matches the model{where} by "
                              f"name and shape ({len(state)} in the file, e.g. {example}; {len(missing)} missing, "
                              f"{len(mismatched)} with other shapes); is it a checkpoint of a related model?")
    # load_state_dict copies into the parameters themselves (state_dict() may hand out contiguous copies)
    model.load_state_dict({k: state[k] for k in loaded}, strict=False)
    return report


def _module_of(key: str) -> str:
    return key.split(".")[0]


def report_table(report: InitReport) -> Any:
    """A rich renderable: per top-level module the counts, then the names skipped (the first few per category)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"model.init_from {report.source}", title_justify="left")
    for column in ("module", "loaded", "missing", "unexpected", "shape mismatch", "not selected"):
        table.add_column(column, justify="left" if column == "module" else "right")
    categories = [report.loaded, report.missing, report.unexpected, [k for k, _, _ in report.mismatched],
                  report.not_selected]
    modules = sorted({_module_of(k) for keys in categories for k in keys})
    for m in modules:
        table.add_row(m, *(str(sum(_module_of(k) == m for k in keys)) for keys in categories))
    lines = []
    for label, keys in (("missing (kept as initialised)", report.missing), ("unexpected (ignored)", report.unexpected),
                        ("not selected (model.init_from_modules)", report.not_selected)):
        if keys:
            more = f" ... and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
            lines.append(f"{label}: " + ", ".join(keys[:SHOWN]) + more)
    for key, file_shape, model_shape in report.mismatched[:SHOWN]:
        lines.append(f"shape mismatch (kept as initialised): {key}: file {file_shape} vs model {model_shape}")
    if len(report.mismatched) > SHOWN:
        lines.append(f"... and {len(report.mismatched) - SHOWN} more shape mismatches")
    return Group(table, *(Text(line) for line in lines))


class Freezer:
    """Forward pre-hook of the model: ``modules`` frozen while ``step() < unfreeze_at`` (always when None)."""

    def __init__(self, model: nn.Module, names: Sequence[str], unfreeze_at: int | None, step: Callable[[], int]):
        self.modules = []
        for name in names:
            try:
                self.modules.append(model.get_submodule(name))
            except AttributeError:
                top = ", ".join(n for n, _ in model.named_children())
                raise RecipeError(f"model.freeze: the model has no module '{name}'; its modules: {top}") from None
        self.unfreeze_at, self.step = unfreeze_at, step
        self.frozen: bool | None = None

    def __call__(self, model: nn.Module, args: Any) -> None:
        frozen = self.unfreeze_at is None or self.step() < self.unfreeze_at
        if frozen != self.frozen:
            for module in self.modules:
                for p in module.parameters():
                    p.requires_grad_(not frozen)
                if not frozen:
                    module.train(model.training)
            self.frozen = frozen
        if frozen:
            for module in self.modules:
                module.eval()


class StepNotifier:
    """Forward pre-hook of the model: tell every submodule with ``set_training_step`` the completed steps."""

    def __init__(self, model: nn.Module, step: Callable[[], int]):
        self.targets = [m for m in model.modules() if callable(getattr(m, "set_training_step", None))]
        self.step = step

    def __call__(self, model: nn.Module, args: Any) -> None:
        if model.training:
            step = self.step()
            for module in self.targets:
                module.set_training_step(step)


def model_options(recipe: dict) -> dict:
    model = recipe.get("model") or {}
    return {key: model.get(key) for key in ("init_from", "init_from_modules", "freeze")}


def init_from_recipe(model: nn.Module, recipe: dict, console: Any = None) -> InitReport | None:
    """model.init_from (restricted by model.init_from_modules), printing the table on ``console``."""
    options = model_options(recipe)
    if not options["init_from"]:
        return None
    report = load_matching(model, options["init_from"], options["init_from_modules"])
    if console is not None:
        console.print(report_table(report))
    return report


def install_training_hooks(model: nn.Module, recipe: dict, unfreeze_at: int | None, step: Callable[[], int]) -> None:
    """model.freeze / train.unfreeze_at and set_training_step, decided now and before every forward. Called once the
    optimizer holds every parameter (frozen ones included, so releasing them needs no new optimizer)."""
    names = model_options(recipe)["freeze"]
    if names:
        freezer = Freezer(model, names, unfreeze_at, step)
        freezer(model, ())  # frozen from the start: the parameter count printed before training says so
        model.register_forward_pre_hook(freezer)
    elif unfreeze_at is not None:
        raise RecipeError("train.unfreeze_at: set, but model.freeze names no module to release")
    notifier = StepNotifier(model, step)
    if notifier.targets:
        model.register_forward_pre_hook(notifier)


def prepare_model(model: nn.Module, recipe: dict, unfreeze_at: int | None, step: Callable[[], int],
                  console: Any = None) -> InitReport | None:
    """Both of the above, for a model used outside the trainer (the trainer calls them at their own points)."""
    report = init_from_recipe(model, recipe, console)
    install_training_hooks(model, recipe, unfreeze_at, step)
    return report
