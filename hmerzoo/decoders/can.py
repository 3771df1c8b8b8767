"""CAN's counting-aware decoder (Li et al., "When Counting Meets HMER", ECCV 2022): a DWAP-style GRU decoder with
coverage attention whose output layer also reads the symbol counts of the multi-scale counting module.

Faithful to the official ``models/decoder.py``, ``models/attention.py``, ``models/counting.py``,
``models/infer_model.py`` (LBH1024/CAN):

- the counting module (:class:`~hmerzoo.layers.multiscale_counting.MultiScaleCounting`, kernels 3 and 5) runs on
  the DenseNet features [B,D,h,w]; its mean count vector [B,V] (one class per vocabulary id) enters every step's
  output through ``counting_proj``. It lives here because the decoder cannot run without it; the
  ``counting`` head (``heads/counting.py``) turns the branches' counts, handed over in ``extras``, into the loss;
- initial state ``tanh(W (masked mean of the features))``; ``Embedding(V, m)``; one ``GRUCell(m, n)`` that reads
  the previous token's embedding;
- attention keys: a 1x1 conv of the features plus a DETR-style 2-D sine position encoding of the valid region
  (``PositionEmbeddingSine(attention_dim / 2, normalize=True)``: y features first, then x);
- coverage attention: ``v . tanh(W h + U_f (Q_11 * coverage) + keys)``, softmax as ``exp(e - max) * mask / (sum +
  1e-10)``;
- output ``W_s h + W_e emb + W_c context + W_cnt counts`` -> dropout (0.5) -> Linear(n, V); no maxout.

Differences from the official code, none of which changes a result beyond float rounding:

- the energy's maximum is taken per row; the official subtracts the maximum over the whole batch, which couples
  the samples of a batch through rounding only (it cancels in the normalisation);
- the 11x11 coverage convolution and its linear projection run as one convolution (their product);
- padded steps: the official pads its decoder inputs with ``eos`` (id 0) and lets the GRU run on; this does too,
  so even the logits at padded positions agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.multiscale_counting import MultiScaleCounting
from ..registry import DECODERS
from ..sequence import DecoderOutput, direction_tokens, teacher_forcing_tensors
from .base import SequenceDecoder


def sine_position_encoding(valid: torch.Tensor, features: int, temperature: float = 10000.0) -> torch.Tensor:
    """CAN's 2-D sine encoding of a valid-region mask [B,h,w] (1 = valid) -> [B,2*features,h,w]: positions are the
    running counts of valid cells, normalised by each row's/column's last value, times 2 pi; sin and cos alternate
    over the feature index; the y half comes first."""
    valid = valid.float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    y = y / (y[:, -1:, :] + 1e-6) * (2 * math.pi)
    x = x / (x[:, :, -1:] + 1e-6) * (2 * math.pi)
    dim = torch.arange(features, dtype=torch.float32, device=valid.device)
    dim = temperature ** (2 * torch.div(dim, 2, rounding_mode="floor") / features)
    pos_x = x[..., None] / dim
    pos_y = y[..., None] / dim
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class CoverageAttention(nn.Module):
    """CAN's attention (official ``Attention``): query from the GRU state, one coverage convolution."""

    def __init__(self, hidden_size: int, attention_dim: int, coverage_channels: int, coverage_kernel: int):
        super().__init__()
        self.attention_dim = attention_dim
        self.query_proj = nn.Linear(hidden_size, attention_dim)
        self.coverage_conv = nn.Conv2d(1, coverage_channels, coverage_kernel, padding=coverage_kernel // 2, bias=False)
        self.coverage_proj = nn.Linear(coverage_channels, attention_dim, bias=False)
        self.energy = nn.Linear(attention_dim, 1)

    def coverage_kernel(self) -> torch.Tensor:
        """The projection applied to every tap of the coverage conv: one conv to attention_dim channels."""
        k = self.coverage_conv.kernel_size[0]
        return (self.coverage_proj.weight @ self.coverage_conv.weight.flatten(1)).view(self.attention_dim, 1, k, k)

    def forward(self, hidden: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor,
                coverage: torch.Tensor, kernel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [N,n], memory [N,D,h,w], keys [N,A,h,w], valid [N,h,w] float, coverage [N,h,w]
        -> (context [N,D], attention [N,h,w])."""
        covered = F.conv2d(coverage[:, None], kernel, padding=kernel.shape[-1] // 2)
        score = torch.tanh(self.query_proj(hidden)[:, :, None, None] + covered + keys)
        energy = torch.einsum("nahw,a->nhw", score, self.energy.weight[0]) + self.energy.bias
        energy = energy - energy.flatten(1).max(1).values[:, None, None]
        weights = torch.exp(energy) * valid
        attention = weights / (weights.sum((1, 2))[:, None, None] + 1e-10)
        context = torch.einsum("ndhw,nhw->nd", memory, attention)
        return context, attention


@dataclass
class CANDecoderState:
    """Incremental state. Per image (M rows): memory, keys, valid, count_context; per hypothesis (N rows):
    memory_row (its image), hidden, coverage. one_row_per_image: no reorder yet, so no gather is needed."""

    memory: torch.Tensor
    keys: torch.Tensor
    valid: torch.Tensor
    count_context: torch.Tensor
    kernel: torch.Tensor
    memory_row: torch.Tensor
    hidden: torch.Tensor
    coverage: torch.Tensor
    one_row_per_image: bool = True


@DECODERS.register("can")
class CANDecoder(SequenceDecoder):
    """CAN's decoder on channels-first features [B,D,h,w] + mask [B,h,w] (True = pad); no neck.

    Official sizes: ``hidden_size`` 256, ``embed_dim`` 256, ``attention_dim`` 512 (the position encoding has
    attention_dim / 2 features per axis), ``coverage_channels`` 512, ``coverage_kernel`` 11, ``dropout`` 0.5,
    ``counting_kernels`` (3, 5), ``counting_channels`` 512. The counting module predicts one count per vocabulary
    id (official: ``counting_decoder.out_channel`` = the dictionary's 111).
    """

    directions = ("l2r",)
    shares_image_memory = True
    # the counting module's channel attention averages over padded positions too, so padding changes the counts
    memory_padding_invariant = False

    def __init__(self, in_channels: int, vocab_size: int, sos_id: int, eos_id: int, pad_id: int | None = None,
                 hidden_size: int = 256, embed_dim: int = 256, attention_dim: int = 512, coverage_channels: int = 512,
                 coverage_kernel: int = 11, dropout: float = 0.5, counting_kernels: Sequence[int] = (3, 5),
                 counting_channels: int = 512):
        super().__init__()
        if attention_dim % 4:
            raise ValueError(f"can decoder: attention_dim must be a multiple of 4 (sine encoding), got {attention_dim}")
        self.d_model = hidden_size
        self.vocab_size, self.sos_id, self.eos_id, self.pad_id = vocab_size, sos_id, eos_id, pad_id
        self.counting = MultiScaleCounting(in_channels, vocab_size, counting_kernels, counting_channels)
        self.init_proj = nn.Linear(in_channels, hidden_size)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.gru = nn.GRUCell(embed_dim, hidden_size)
        self.attention = CoverageAttention(hidden_size, attention_dim, coverage_channels, coverage_kernel)
        self.key_proj = nn.Conv2d(in_channels, attention_dim, kernel_size=1)
        self.state_proj = nn.Linear(hidden_size, hidden_size)
        self.embedding_proj = nn.Linear(embed_dim, hidden_size)
        self.context_proj = nn.Linear(in_channels, hidden_size)
        self.counting_proj = nn.Linear(vocab_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, vocab_size)

    # --- shared pieces --------------------------------------------------------------------------------------------
    def keys(self, memory: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.key_proj(memory) + sine_position_encoding(valid, self.attention.attention_dim // 2)

    def initial_hidden(self, memory: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        mean = torch.einsum("bdhw,bhw->bd", memory, valid) / valid.sum((1, 2))[:, None]
        return torch.tanh(self.init_proj(mean))

    def output(self, hidden: torch.Tensor, embedded: torch.Tensor, context: torch.Tensor,
               count_context: torch.Tensor) -> torch.Tensor:
        state = self.state_proj(hidden) + self.embedding_proj(embedded) + self.context_proj(context) + count_context
        return self.classifier(self.dropout(state))

    # --- teacher forcing ----------------------------------------------------------------------------------------
    def decode(self, memory: torch.Tensor, memory_mask: torch.Tensor,
               inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Teacher-forced pass over inputs [B,T] (sos first) -> (logits [B,T,V], states [B,T,n], extras)."""
        memory_mask = memory_mask.bool()
        valid = (~memory_mask).to(memory.dtype)
        counts, count_vector = self.counting(memory, memory_mask)
        count_context = self.counting_proj(count_vector)
        keys = self.keys(memory, valid)
        kernel = self.attention.coverage_kernel()
        hidden = self.initial_hidden(memory, valid)
        coverage = memory.new_zeros(memory.shape[0], *memory.shape[2:])
        embedded = self.embedding(inputs)
        states, contexts, attentions = [], [], []
        for t in range(inputs.shape[1]):
            hidden = self.gru(embedded[:, t], hidden)
            context, attention = self.attention(hidden, memory, keys, valid, coverage, kernel)
            coverage = coverage + attention
            states.append(hidden)
            contexts.append(context)
            attentions.append(attention)
        states_t = torch.stack(states, 1)
        logits = self.output(states_t, embedded, torch.stack(contexts, 1), count_context[:, None])
        return logits, states_t, {"counting": counts, "count_vector": count_vector,
                                  "attention": torch.stack(attentions, 1)}

    def _teacher_forcing(self, tokens: Sequence[Sequence[int]], device: torch.device):
        # inputs padded with eos, as the official label padding (id 0 = eos) that the decoder reads
        return teacher_forcing_tensors(tokens, "l2r", self.sos_id, self.eos_id, self.eos_id, device)

    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                tokens: Sequence[Sequence[int]]) -> DecoderOutput:
        inputs, targets = self._teacher_forcing(tokens, memory.device)
        logits, states, extras = self.decode(memory, memory_mask, inputs)
        return DecoderOutput(logits=logits, targets=targets, hidden=states, directions=["l2r"] * len(tokens),
                             extras=extras)

    def teacher_forced(self, memory: torch.Tensor, memory_mask: torch.Tensor, tokens: Sequence[Sequence[int]],
                       direction: str = "l2r") -> tuple[torch.Tensor, torch.Tensor]:
        self._check_direction(direction)
        inputs, targets = self._teacher_forcing(tokens, memory.device)
        return self.decode(memory, memory_mask, inputs)[0], targets

    # --- incremental decoding -----------------------------------------------------------------------------------
    def _check_direction(self, direction: str | Sequence[str]) -> None:
        kinds = {direction} if isinstance(direction, str) else set(direction)
        if kinds - {"l2r"}:
            raise ValueError(f"can decoder: decodes left to right only, got directions {sorted(kinds)}")

    def init_state(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                   direction: str | Sequence[str] = "l2r") -> CANDecoderState:
        self._check_direction(direction)
        direction_tokens(self.sos_id, self.eos_id, "l2r")
        mask = memory_mask.bool()
        valid = (~mask).to(memory.dtype)
        _, count_vector = self.counting(memory, mask)
        n = memory.shape[0]
        return CANDecoderState(memory=memory, keys=self.keys(memory, valid), valid=valid,
                               count_context=self.counting_proj(count_vector), kernel=self.attention.coverage_kernel(),
                               memory_row=torch.arange(n, device=memory.device),
                               hidden=self.initial_hidden(memory, valid),
                               coverage=memory.new_zeros(n, *memory.shape[2:]))

    def step(self, state: CANDecoderState, last_tokens: torch.Tensor) -> tuple[torch.Tensor, CANDecoderState]:
        """Logits [N,V] of the next token after ``last_tokens`` [N] (official ``infer_model.AttDecoder`` step)."""
        if state.one_row_per_image:
            memory, keys, valid, count_context = state.memory, state.keys, state.valid, state.count_context
        else:
            rows = state.memory_row
            memory, keys, valid, count_context = (t.index_select(0, rows) for t in
                                                  (state.memory, state.keys, state.valid, state.count_context))
        embedded = self.embedding(last_tokens)
        hidden = self.gru(embedded, state.hidden)
        context, attention = self.attention(hidden, memory, keys, valid, state.coverage, state.kernel)
        logits = self.output(hidden, embedded, context, count_context)
        return logits, replace(state, hidden=hidden, coverage=state.coverage + attention)

    def reorder_state(self, state: CANDecoderState, index: torch.Tensor) -> CANDecoderState:
        return replace(state, memory_row=state.memory_row.index_select(0, index),
                       hidden=state.hidden.index_select(0, index), coverage=state.coverage.index_select(0, index),
                       one_row_per_image=False)
