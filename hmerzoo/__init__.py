"""hmerzoo: Handwritten Mathematical Expression Recognition model zoo."""
from .builder import build_model, load_model
from .recipe import load_recipe, validate_recipe
from .registry import DECODERS, ENCODERS, HEADS, LOSSES, NECKS, OPTIMIZERS, SCHEDULERS
from .vocab import Vocabulary

__version__ = "0.1.0"

from . import components  # noqa: E402,F401  (register built-in components on import)

__all__ = ["build_model", "load_model", "load_recipe", "validate_recipe", "Vocabulary", "ENCODERS", "NECKS",
           "DECODERS", "HEADS", "LOSSES", "OPTIMIZERS", "SCHEDULERS"]
