"""HMER-MTL's auxiliary task: predict the caption's structure-and-operator skeleton at every decoder position.

Official ``mtl/model/decoder.py`` (``proj_imp``), ``mtl/utils/utils.py::to_tgt_output(..., is_implicit=True)`` and
``mtl/lit_mtl.py::training_step``:

- a second ``Linear(d_model, vocab_size)`` on the same final decoder states as the main output layer (no extra
  layers; inference does not use it);
- its target is the caption with every token outside :data:`SKELETON_TOKENS` replaced by ``<space>``, then built
  exactly like the main target for each row's direction: L2R ``s1..sn <eos>``, R2L ``sn..s1 <sos>`` (the start/stop
  tokens are not replaced), positions past the end ignored;
- loss = ``weight`` (lambda_2) x token-mean cross-entropy over all rows, as the official ``ce_loss``.

The decoder input stays the real caption (the official code builds skeleton decoder inputs too but never uses them).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..batch import Batch
from ..errors import RecipeError
from ..sequence import IGNORE_INDEX, DecoderOutput, teacher_forcing_tensors, to_device
from ..registry import HEADS
from ..vocab import Vocabulary

# The 17 tokens the official skeleton keeps: structure (braces, scripts, fractions, roots, brackets) and the
# common operators/relations.
SKELETON_TOKENS = ("{", "}", "^", "_", r"\frac", r"\sqrt", "[", "]", "+", "=", "-", r"\times", r"\cdot", r"\div",
                   r"\geq", ">", "<")
SPACE_TOKEN = "<space>"


@HEADS.register("structure_skeleton")
class StructureSkeletonHead(nn.Module):
    """Skeleton classification on the decoder's final states (``output.hidden``), one target per position.

    ``weight``: the loss weight (HMER-MTL's lambda_2; the main loss's weight is lambda_1).
    ``keep_tokens``: the tokens kept in the skeleton (default: the official 17); tokens the vocabulary does not
    have are ignored, since no caption can contain them.
    """

    def __init__(self, d_model: int, vocab: Vocabulary, weight: float = 1.0,
                 keep_tokens: Sequence[str] | None = None):
        super().__init__()
        if d_model is None:
            raise RecipeError("structure_skeleton head: the decoder does not say its width (d_model); it needs a "
                              "decoder that exposes d_model and returns its hidden states")
        if SPACE_TOKEN not in vocab:
            raise RecipeError(f"structure_skeleton head: the vocabulary has no '{SPACE_TOKEN}' token, which replaces "
                              f"every non-skeleton token in its targets; add it to vocab.specials (HMER-MTL uses "
                              f"[<pad>, <sos>, <eos>, <space>])")
        self.weight = weight
        self.space_id = vocab.token_to_id[SPACE_TOKEN]
        self.sos_id, self.eos_id = vocab.sos_id, vocab.eos_id
        self.pad_id = vocab.pad_id if vocab.pad_id is not None else 0  # only fills decoder inputs we never use
        keep = SKELETON_TOKENS if keep_tokens is None else tuple(keep_tokens)
        self.keep_tokens = list(keep)
        self.keep_ids = frozenset(vocab.token_to_id[t] for t in keep if t in vocab)
        self.linear = nn.Linear(d_model, len(vocab))

    def skeleton(self, tokens: Sequence[int]) -> list[int]:
        """Token ids -> skeleton ids (same length): every id outside the kept set becomes ``<space>``."""
        return [t if t in self.keep_ids else self.space_id for t in tokens]

    def targets(self, tokens: Sequence[Sequence[int]], directions: Sequence[str], length: int,
                device: torch.device) -> torch.Tensor:
        """Skeleton targets [N, length] for decoder rows in ``directions`` (each direction's rows are the batch's
        samples in order, as bidirectional decoders stack them), IGNORE_INDEX past each end."""
        skeletons = [self.skeleton(t) for t in tokens]
        n = len(directions)
        out = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        for direction in dict.fromkeys(directions):
            rows = [i for i, d in enumerate(directions) if d == direction]
            if len(rows) != len(skeletons):
                raise ValueError(f"structure_skeleton head: the decoder output has {len(rows)} {direction} rows for "
                                 f"a batch of {len(skeletons)} samples; expected one per sample")
            _, target = teacher_forcing_tensors(skeletons, direction, self.sos_id, self.eos_id, self.pad_id)
            if target.shape[1] > length:
                raise ValueError(f"structure_skeleton head: targets of length {target.shape[1]} do not fit the "
                                 f"decoder output's {length} positions")
            out[rows, :target.shape[1]] = target
        return to_device(out, device)  # built on the host: one asynchronous copy

    def forward(self, output: DecoderOutput, batch: Batch) -> torch.Tensor:
        if output.hidden is None:
            raise ValueError("structure_skeleton head: the decoder returned no hidden states (DecoderOutput.hidden); "
                             "it needs a decoder that does (bttr, comer)")
        logits = self.linear(output.hidden)
        n, length, classes = logits.shape
        directions = output.directions or (["l2r"] * n)  # a one-direction decoder may leave them unsaid
        targets = self.targets(batch.tokens, directions, length, logits.device)
        loss = F.cross_entropy(logits.reshape(-1, classes).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return self.weight * loss

    def extra_repr(self) -> str:
        return f"weight={self.weight}, keep_tokens={len(self.keep_tokens)}"
