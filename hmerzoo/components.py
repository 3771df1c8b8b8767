"""Importing this module registers every built-in component (encoders, necks, decoders, heads, losses,
optimizers, schedulers, datasets, transforms)."""
from . import data, decoders, encoders, heads, losses, necks, optim, selfsup  # noqa: F401
