"""ICAL's implicit-character task (Zhu et al., ICDAR 2024, qingzhenduyu/ICAL): the structure that LaTeX writes but
the image does not show (``{ } ^ _``) is predicted at every decoder position, and the model's prediction fuses it
with the explicit one.

What the official ``ical/model/decoder.py``, ``ical/utils/utils.py`` and ``ical/lit_ical.py`` do, and this head does:

- SCCM: one post-LN transformer *encoder* layer (8 heads, feed-forward 1024, dropout 0.3, ReLU) over the final
  decoder states, causal and with the decoder inputs' ``<pad>`` positions masked as keys;
- implicit logits: ``Linear(ReLU(sccm))``; their target is the caption with every token but ``{ } ^ _`` replaced by
  ``<space>`` (:func:`implicit_ids`), built per direction like the main target (stop tokens kept);
- fusion: ``g = sigmoid(W [e; i])``, ``f = g * i + (1 - g) * e`` (e: decoder states, i: SCCM states), fused logits
  ``Linear(ReLU(f))``, trained on the main targets;
- inference reads the FUSED logits (the official ``transform``): with ``fuse`` the head attaches itself to the
  decoder as its output layer (``attach_output``), so beam search, rescoring, ``score`` and greedy all use them;
- loss = CE(explicit) (the recipe's main loss on the decoder's own ``proj``) + CE(implicit) + CE(fused), each
  weight 1. The implicit CE weighs classes dynamically (``dynamic_weight``): with f the fraction of ``<space>``
  among all target positions of the batch (padding included, as the official ``smooth_weight_adjustment``), every
  class but ``<space>`` gets ``min(1 + log1p(1 / (1 - f + 1e-6)), max_weight)``, ``<space>`` keeps 1.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..batch import Batch
from ..errors import RecipeError
from ..layers.attention import MultiheadAttention
from ..registry import HEADS
from ..sequence import IGNORE_INDEX, DecoderOutput, teacher_forcing_tensors, to_device
from ..vocab import Vocabulary

IMPLICIT_TOKENS = ("{", "}", "^", "_")  # what LaTeX writes and handwriting does not show
SPACE_TOKEN = "<space>"


def implicit_latex(latex: str, keep: Sequence[str] = IMPLICIT_TOKENS) -> str:
    """A space-separated caption -> its implicit-character labels (``x ^ { 2 }`` -> ``<space> ^ { <space> }``)."""
    return " ".join(t if t in keep else SPACE_TOKEN for t in latex.split())


def implicit_ids(tokens: Sequence[int], keep_ids: frozenset[int], space_id: int) -> list[int]:
    """Token ids -> implicit-character label ids (same length)."""
    return [t if t in keep_ids else space_id for t in tokens]


class EncoderLayer(nn.Module):
    """Post-LN ``torch.nn.TransformerEncoderLayer`` (ReLU) under any attention mask (ICAL's SCCM: causal; TAMER's
    structure layer: padding only), with a key/value cache for decoding one position at a time. Parameter names
    mirror torch's layer."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past_k: torch.Tensor | None = None,
                past_v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N,L,d], bool mask (True = may attend) [N,1,L,S] -> (x', keys, values incl. the past ones)."""
        q, k, v = self.self_attn.project_all(x)
        if past_k is not None:
            k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        x = self.norm1(x + self.dropout1(self.self_attn.attend(q, k, v, mask)))
        x = self.norm2(x + self.dropout2(self.linear2(self.dropout(F.relu(self.linear1(x))))))
        return x, k, v


@HEADS.register("implicit_characters")
class ImplicitCharacterHead(nn.Module):
    """ICAL's SCCM + implicit-character classifier + fusion (see the module docstring).

    ``fuse``: build the fusion and make the decoder predict with the fused logits (official ICAL); false keeps only
    the auxiliary implicit-character loss and the decoder's own prediction (ICAL's "w/o fusion" ablation; works on
    any decoder that returns its hidden states). ``implicit_weight``, ``fusion_weight``: the two loss weights
    (official 1, 1). ``dynamic_weight``/``max_weight``: the implicit CE's class weights (official true, 10).
    ``nhead``, ``dim_feedforward``, ``dropout``: the SCCM layer (official 8, 1024, 0.3, whatever d_model is).
    """

    def __init__(self, d_model: int, vocab: Vocabulary, decoder: Any = None, fuse: bool = True,
                 implicit_weight: float = 1.0, fusion_weight: float = 1.0, dynamic_weight: bool = True,
                 max_weight: float = 10.0, nhead: int = 8, dim_feedforward: int = 1024, dropout: float = 0.3,
                 keep_tokens: Sequence[str] | None = None):
        super().__init__()
        if d_model is None:
            raise RecipeError("implicit_characters head: the decoder does not say its width (d_model)")
        if SPACE_TOKEN not in vocab:
            raise RecipeError(f"implicit_characters head: the vocabulary has no '{SPACE_TOKEN}' token, the label of "
                              f"every explicit character; add it to vocab.specials (ICAL: [<pad>, <sos>, <eos>, "
                              f"<space>])")
        self.fuse = fuse
        self.implicit_weight = implicit_weight
        self.fusion_weight = fusion_weight
        self.dynamic_weight = dynamic_weight
        self.max_weight = max_weight
        self.space_id = vocab.token_to_id[SPACE_TOKEN]
        self.sos_id, self.eos_id = vocab.sos_id, vocab.eos_id
        self.pad_id = vocab.pad_id if vocab.pad_id is not None else 0  # only fills inputs we never read
        self.keep_tokens = list(IMPLICIT_TOKENS if keep_tokens is None else keep_tokens)
        self.keep_ids = frozenset(vocab.token_to_id[t] for t in self.keep_tokens if t in vocab)
        self.num_classes = len(vocab)
        self.sccm = EncoderLayer(d_model, nhead, dim_feedforward, dropout)
        self.implicit_proj = nn.Linear(d_model, len(vocab))
        if fuse:
            if decoder is None or not hasattr(decoder, "attach_output"):
                raise RecipeError("implicit_characters head: fuse: true makes the decoder predict with the fused "
                                  f"logits, which needs a transformer decoder (bttr, comer); "
                                  f"{type(decoder).__name__} has no attach_output. Set fuse: false for the "
                                  "auxiliary loss alone")
            self.gate = nn.Linear(2 * d_model, d_model)
            self.fusion_proj = nn.Linear(d_model, len(vocab))
            decoder.attach_output(self)

    # --- targets ----------------------------------------------------------------------------------------------
    def targets(self, tokens: Sequence[Sequence[int]], directions: Sequence[str], length: int,
                device: torch.device) -> torch.Tensor:
        """Implicit targets [N, length] for decoder rows in ``directions`` (each direction's rows: the batch's
        samples in order), IGNORE_INDEX past each end."""
        labels = [implicit_ids(t, self.keep_ids, self.space_id) for t in tokens]
        out = torch.full((len(directions), length), IGNORE_INDEX, dtype=torch.long)
        for direction in dict.fromkeys(directions):
            rows = [i for i, d in enumerate(directions) if d == direction]
            if len(rows) != len(labels):
                raise ValueError(f"implicit_characters head: {len(rows)} {direction} rows for a batch of "
                                 f"{len(labels)} samples; expected one per sample")
            _, target = teacher_forcing_tensors(labels, direction, self.sos_id, self.eos_id, self.pad_id)
            out[rows, :target.shape[1]] = target
        return to_device(out, device)

    def class_weights(self, targets: torch.Tensor) -> torch.Tensor | None:
        if not self.dynamic_weight:
            return None
        frequency = (targets == self.space_id).sum().float() / targets.numel()  # stays on the device
        weight = (1.0 + torch.log1p(1.0 / ((1.0 - frequency) + 1e-6))).clamp(max=self.max_weight)
        weights = weight.expand(self.num_classes).clone()
        weights[self.space_id] = 1.0
        return weights

    # --- the computation ----------------------------------------------------------------------------------------
    def _mask(self, pad: torch.Tensor) -> torch.Tensor:
        length = pad.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=pad.device).tril()
        return causal[None, None] & ~pad[:, None, None, :]

    def _fused(self, hidden: torch.Tensor, implicit: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(torch.cat((hidden, implicit), dim=-1)))
        return self.fusion_proj(F.relu(g * implicit + (1 - g) * hidden))

    def forward(self, output: DecoderOutput, batch: Batch) -> dict[str, torch.Tensor]:
        if output.hidden is None:
            raise ValueError("implicit_characters head: the decoder returned no hidden states")
        hidden = output.hidden
        n, length, _ = hidden.shape
        pad = output.targets == IGNORE_INDEX  # exactly the positions whose decoder input is <pad>
        implicit, _, _ = self.sccm(hidden, self._mask(pad))
        directions = output.directions or (["l2r"] * n)
        targets = self.targets(batch.tokens, directions, length, hidden.device)
        logits = self.implicit_proj(F.relu(implicit)).reshape(-1, self.num_classes).float()
        losses = {"implicit": self.implicit_weight * F.cross_entropy(
            logits, targets.reshape(-1), weight=self.class_weights(targets), ignore_index=IGNORE_INDEX)}
        if self.fuse:
            fused = self._fused(hidden, implicit).reshape(-1, self.num_classes).float()
            losses["fusion"] = self.fusion_weight * F.cross_entropy(fused, output.targets.reshape(-1),
                                                                    ignore_index=IGNORE_INDEX)
        return losses

    def implicit_logits(self, hidden: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """The implicit-character logits [N,L,V] of decoder states [N,L,d] (``pad``: <pad> inputs, [N,L])."""
        implicit, _, _ = self.sccm(hidden, self._mask(pad))
        return self.implicit_proj(F.relu(implicit))

    # --- the decoder's output layer (attach_output) ----------------------------------------------------------------
    def output_logits(self, hidden: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Fused logits [N,L,V] of a teacher-forced pass: decoder states [N,L,d], <pad> inputs [N,L]."""
        implicit, _, _ = self.sccm(hidden, self._mask(pad))
        return self._fused(hidden, implicit)

    def init_output_state(self, num_rows: int, device: torch.device) -> None:
        return None  # no position yet: the key/value cache starts at the first step, in that step's dtype

    def step_output(self, hidden: torch.Tensor, pad: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None
                    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """One position: decoder state [N,d], <pad> flags of all inputs so far [N,t] -> fused logits [N,V]."""
        x = hidden[:, None]
        past_k, past_v = state if state is not None else (None, None)
        implicit, k, v = self.sccm(x, (~pad)[:, None, None, :], past_k=past_k, past_v=past_v)
        return self._fused(x, implicit)[:, 0], (k, v)

    def reorder_output_state(self, state: tuple[torch.Tensor, torch.Tensor] | None,
                             index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if state is None else (state[0].index_select(0, index), state[1].index_select(0, index))

    def extra_repr(self) -> str:
        return (f"fuse={self.fuse}, implicit_weight={self.implicit_weight}, fusion_weight={self.fusion_weight}, "
                f"dynamic_weight={self.dynamic_weight}")
