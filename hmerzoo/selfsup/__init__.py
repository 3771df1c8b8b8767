"""Mask & Match (Mitra, Chakraborty, Sahu, 2025): self-supervised pre-training from images alone.

``views`` (two augmented views with their geometric correspondence), ``losses`` (NT-Xent, dense InfoNCE, the
stage objectives; LOSSES), ``masking`` (the progressive block-masking curriculum), ``attention`` (the attention
network, the neck ``mask_match_attention``), ``models`` (the stage-1 and stage-2 models; MODELS) and ``images``
(the image-only dataset ``images``; DATASETS). docs/mask_match.md describes the method and the choices.
"""
from . import attention, images, losses, masking, models, views  # noqa: F401  (registers the components)
