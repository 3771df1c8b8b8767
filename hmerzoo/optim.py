"""Optimizers and learning-rate schedulers a recipe can name (``optim.type``, ``sched.type``).

An optimizer entry is called with ``params`` (the model's trainable parameters) plus the recipe's keys.
"""
from __future__ import annotations

import torch

from .registry import OPTIMIZERS

OPTIMIZERS.add("adadelta", torch.optim.Adadelta)
OPTIMIZERS.add("sgd", torch.optim.SGD)
OPTIMIZERS.add("adamw", torch.optim.AdamW)
OPTIMIZERS.add("adam", torch.optim.Adam)
