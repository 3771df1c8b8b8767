"""ABM's decoder: two independent WAP-style GRU decoders, L2R and R2L, on one image memory (Bian et al., AAAI 2022).

Faithful to the official ``encoder_decoder.py`` / ``decoder.py`` (XH-B/ABM). Each direction is an
:class:`ABMBranch` with its own weights:

- initial state ``tanh(W (masked mean of the features))``;
- ``Embedding(V, m)``;
- a two-layer conditional GRU: GRU 1 reads the previous token's embedding -> h1; the Attention Aggregation
  Module (:mod:`hmerzoo.layers.attention_aggregation`) attends with h1 and the coverage -> context c; GRU 2
  reads c -> h2.
  The GRUs are the official hand-written ones (the reset gate scales ``U h``, biases where the official has them);
  their three gate projections are packed into one matrix each, ordered (update z, reset r, candidate h);
- the output layer ``W_c c + W_h h2 + W_y emb`` -> maxout over adjacent pairs (m -> m/2) -> dropout -> Linear.

Training runs both directions (rows: B L2R then B R2L, as BTTR stacks them); inference uses one of them (ABM uses
L2R). The official pads its decoder inputs with each direction's start token (``sos`` for L2R, ``eos`` for R2L)
and freezes the GRU state on padded steps, while the coverage still accumulates there; this decoder does the same,
so even the logits at padded positions equal the official ones.

Differences from the official code, none of which changes a result where the official has one:

- the 11x11 and 5x5 coverage convolutions and their projections run as one fused convolution, and the attention
  softmax subtracts the maximum (see :mod:`hmerzoo.layers.attention_aggregation`);
- incremental decoding keeps the masked mean and the memory mask; the official ``f_init`` takes an unmasked mean
  and ``f_next`` no mask, which is the same for the unpadded single image it decodes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..sequence import IGNORE_INDEX, DecoderOutput, direction_tokens, teacher_forcing_tensors
from ..registry import DECODERS
from ..layers.attention_aggregation import AttentionAggregation
from .base import SequenceDecoder

DIRECTIONS = ("l2r", "r2l")
GATES = 3  # packed GRU projections: update z, reset r, candidate h


class MaxoutOutput(nn.Module):
    """``W_c c + W_h h + W_y emb`` -> maxout over adjacent pairs -> dropout -> Linear (official ``Gru_prob``)."""

    def __init__(self, context_dim: int, hidden_size: int, embed_dim: int, vocab_size: int, dropout: float):
        super().__init__()
        if embed_dim % 2:
            raise ValueError(f"abm decoder: the maxout output pairs units, so embed_dim must be even, got {embed_dim}")
        self.context_proj = nn.Linear(context_dim, embed_dim)
        self.hidden_proj = nn.Linear(hidden_size, embed_dim)
        self.embedding_proj = nn.Linear(embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(embed_dim // 2, vocab_size)

    def forward(self, context: torch.Tensor, hidden: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        x = self.context_proj(context) + self.hidden_proj(hidden) + self.embedding_proj(embedded)
        x = x.unflatten(-1, (-1, 2)).max(dim=-1).values  # units (2k, 2k+1) -> k, as the official view(..., 2)
        return self.classifier(self.dropout(x))


class ABMBranch(nn.Module):
    """One direction's decoder: init state, embedding, conditional GRU with AAM attention, maxout output."""

    def __init__(self, in_channels: int, vocab_size: int, hidden_size: int, embed_dim: int, attention_dim: int,
                 coverage_channels: int, coverage_kernels: Sequence[int], dropout: float):
        super().__init__()
        self.hidden_size = hidden_size
        self.init_proj = nn.Linear(in_channels, hidden_size)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.gru1_input = nn.Linear(embed_dim, GATES * hidden_size)  # W_yz | W_yr | W_yh
        self.gru1_hidden = nn.Linear(hidden_size, GATES * hidden_size, bias=False)  # U_hz | U_hr | U_hh
        self.attention = AttentionAggregation(in_channels, hidden_size, attention_dim, coverage_channels,
                                              coverage_kernels)
        self.gru2_input = nn.Linear(in_channels, GATES * hidden_size, bias=False)  # W_cz | W_cr | W_ch
        self.gru2_hidden = nn.Linear(hidden_size, GATES * hidden_size)  # U_hz2 | U_hr2 | U_hh2
        self.output = MaxoutOutput(in_channels, hidden_size, embed_dim, vocab_size, dropout)

    def recurrent_parts(self) -> list[nn.Module]:
        """What the official ``Gru_cond_layer_aam`` holds: both GRUs and the attention (for initialisation)."""
        return [self.gru1_input, self.gru1_hidden, self.attention, self.gru2_input, self.gru2_hidden]

    def packed_linears(self) -> list[nn.Module]:
        """The linears that stack the three gates' matrices."""
        return [self.gru1_input, self.gru1_hidden, self.gru2_input, self.gru2_hidden]

    def initial_hidden(self, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """tanh(W mean(ctx)) over the valid positions: memory [B,D,h,w], mask [B,h,w] (True = pad) -> [B,n]."""
        valid = (~memory_mask).to(memory.dtype)
        mean = torch.einsum("bdhw,bhw->bd", memory, valid) / valid.sum((1, 2))[:, None]
        return torch.tanh(self.init_proj(mean))

    def gru1(self, hidden: torch.Tensor, input_gates: torch.Tensor) -> torch.Tensor:
        """First GRU: previous state [N,n] and the embedding's projections [N,3n] -> h1."""
        z_in, r_in, h_in = input_gates.chunk(GATES, dim=-1)
        z_rec, r_rec, h_rec = self.gru1_hidden(hidden).chunk(GATES, dim=-1)
        update = torch.sigmoid(z_rec + z_in)
        reset = torch.sigmoid(r_rec + r_in)
        candidate = torch.tanh(h_rec * reset + h_in)
        return update * hidden + (1.0 - update) * candidate

    def gru2(self, h1: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Second GRU: h1 [N,n] and the attention context [N,D] -> h2."""
        z_in, r_in, h_in = self.gru2_input(context).chunk(GATES, dim=-1)
        z_rec, r_rec, h_rec = self.gru2_hidden(h1).chunk(GATES, dim=-1)
        update = torch.sigmoid(z_in + z_rec)
        reset = torch.sigmoid(r_in + r_rec)
        candidate = torch.tanh(h_in + h_rec * reset)
        return update * h1 + (1.0 - update) * candidate

    def forward(self, hidden: torch.Tensor, input_gates: torch.Tensor, valid: torch.Tensor, memory: torch.Tensor,
                keys: torch.Tensor, memory_mask: torch.Tensor, coverage: torch.Tensor,
                kernel: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """One teacher-forced step: state [N,n], the embedding's gate projections [N,3n], valid [N,1] (False: a
        padded step, whose GRU state update is discarded) -> (h2, coverage, context, attention)."""
        h1 = torch.where(valid, self.gru1(hidden, input_gates), hidden)
        context, attention = self.attention(h1, memory, keys, memory_mask, coverage, kernel)
        coverage = coverage + attention  # also on padded steps, as the official alpha_past
        return torch.where(valid, self.gru2(h1, context), h1), coverage, context, attention

    def decode(self, memory: torch.Tensor, memory_mask: torch.Tensor, inputs: torch.Tensor,
               step_valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced pass. inputs [B,T] (start token first), step_valid [B,T] bool (False: padded step, whose
        GRU state update is discarded) -> (logits [B,T,V], h2 [B,T,n], attention [B,T,h,w])."""
        memory_mask = memory_mask.bool()
        kernel = self.attention.coverage_kernel()
        keys = self.attention.keys(memory)
        hidden = self.initial_hidden(memory, memory_mask)
        embedded = self.embedding(inputs)
        input_gates = self.gru1_input(embedded)  # all steps at once, as the official state_below_*
        coverage = memory.new_zeros(memory.shape[0], *memory.shape[2:])
        # self(...): the step is this module's forward, so train.compile compiles it, one graph for every step and
        # caption length (compiling the loop would specialise on the length). For that graph to be reused, every
        # step's inputs look alike: the first coverage requires grad as the later ones do, and each step's slices
        # are fresh tensors (views at step t would carry storage offset t, which the compiler guards on).
        coverage.requires_grad_(torch.is_grad_enabled() and memory.requires_grad)
        states, contexts, attentions = [], [], []
        for t in range(inputs.shape[1]):
            hidden, coverage, context, attention = self(hidden, input_gates[:, t].clone(),
                                                        step_valid[:, t, None].clone(), memory, keys, memory_mask,
                                                        coverage, kernel)
            states.append(hidden)
            contexts.append(context)
            attentions.append(attention)
        states_t = torch.stack(states, dim=1)
        logits = self.output(torch.stack(contexts, dim=1), states_t, embedded)
        return logits, states_t, torch.stack(attentions, dim=1)


@dataclass
class ABMDecoderState:
    """Incremental-decoding state of one branch. Rows N are hypotheses; memory rows M are images.

    memory/keys/memory_mask: per image, computed once; kernel: the fused coverage convolution; memory_row [N]: the
    image of each row; hidden [N,n]: the GRU state (h2 of the last step); coverage [N,h,w]: the summed attention.
    one_row_per_image: row i still reads image i (no reorder yet, as in greedy decoding), so no gather is needed;
    a flag kept on the host, since comparing ``memory_row`` with the identity would wait for the device every step.
    """

    direction: str
    memory: torch.Tensor
    keys: torch.Tensor
    memory_mask: torch.Tensor
    kernel: tuple[torch.Tensor, torch.Tensor]
    memory_row: torch.Tensor
    hidden: torch.Tensor
    coverage: torch.Tensor
    one_row_per_image: bool = True


@DECODERS.register("abm")
class ABMDecoder(SequenceDecoder):
    """ABM's two-branch decoder on channels-first features [B,D,h,w] + mask [B,h,w] (True = pad); no neck.

    ``hidden_size`` n, ``embed_dim`` m, ``attention_dim``, ``coverage_channels``, ``coverage_kernels``: the
    official 256 / 256 / 512 / 512 / (11, 5); ``dropout``: the output layer's (0.2). ``directions``: the branches
    (official ABM: both; WAP-style single-direction models: one). ``init``: ``official`` (train.py: Kaiming-uniform
    for every conv/linear, biases 0, then Xavier-uniform for the R2L branch's init/GRU/attention layers) or
    ``default`` (PyTorch's). ``pad_id`` is not needed: inputs are padded with each direction's start token.
    """

    # the branches have their own weights: the direction picks the weights, so one search batch per direction
    supports_mixed_directions = False
    # (the decoding itself is padding invariant - masked mean, masked attention, zero coverage outside the image -
    # but the shared search pads memories channels-last, and this memory is channels-first)
    memory_padding_invariant = False
    # reorder_state moves the hidden state, the coverage and the row -> image index; the memory stays per image
    shares_image_memory = True

    def __init__(self, in_channels: int, vocab_size: int, sos_id: int, eos_id: int, pad_id: int | None = None,
                 hidden_size: int = 256, embed_dim: int = 256, attention_dim: int = 512,
                 coverage_channels: int = 512, coverage_kernels: Sequence[int] = (11, 5), dropout: float = 0.2,
                 directions: Sequence[str] = DIRECTIONS, init: str = "official"):
        super().__init__()
        directions = list(directions)
        if not directions or any(d not in DIRECTIONS for d in directions) or len(set(directions)) != len(directions):
            raise ValueError(f"abm decoder: directions must be distinct values of {list(DIRECTIONS)}, got {directions}")
        if init not in ("official", "default"):
            raise ValueError(f"abm decoder: init must be 'official' or 'default', got {init!r}")
        self.d_model = hidden_size
        self.vocab_size = vocab_size
        self.sos_id = sos_id
        self.eos_id = eos_id
        self.directions = [d for d in DIRECTIONS if d in directions]  # L2R rows first, as the training output

        def make_branch() -> ABMBranch:
            return ABMBranch(in_channels, vocab_size, hidden_size, embed_dim, attention_dim, coverage_channels,
                             coverage_kernels, dropout)

        self.l2r = make_branch() if "l2r" in directions else None
        self.r2l = make_branch() if "r2l" in directions else None
        if init == "official":
            self.reset_parameters_official()

    def branch(self, direction: str) -> ABMBranch:
        branch = getattr(self, direction, None) if direction in DIRECTIONS else None
        if branch is None:
            raise ValueError(f"abm decoder: no {direction!r} branch; this decoder has {self.directions}")
        return branch

    def reset_parameters_official(self) -> None:
        """The official train.py initialisation: Kaiming-uniform (gain sqrt 2) on every conv/linear weight, zero
        biases; then Xavier-uniform for the R2L branch's ``init_GRU_model2`` and ``gru_model2`` (its embedding
        keeps N(0,1): ``weight_init`` touches only convs and linears; its output layer stays Kaiming).
        Packed GRU matrices are initialised per gate, as the official's separate 256-row layers."""
        for branch in (self.l2r, self.r2l):
            if branch is not None:
                _init_weights(branch, nn.init.kaiming_uniform_, branch.packed_linears())
        if self.r2l is not None:
            for part in [self.r2l.init_proj, *self.r2l.recurrent_parts()]:
                _init_weights(part, nn.init.xavier_uniform_, self.r2l.packed_linears())

    def _teacher_forcing(self, tokens: Sequence[Sequence[int]], direction: str,
                         device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        start, _ = direction_tokens(self.sos_id, self.eos_id, direction)
        # no padding token: the official pads the inputs with the direction's start token and masks those steps
        return teacher_forcing_tensors(tokens, direction, self.sos_id, self.eos_id, start, device)

    # --- teacher forcing ----------------------------------------------------------------------------------------
    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                tokens: Sequence[Sequence[int]]) -> DecoderOutput:
        """Every branch on every sample: rows B L2R then B R2L; extras["attention"]: [rows,T,h,w]."""
        logits, targets, hidden, attention, directions = [], [], [], [], []
        for direction in self.directions:
            inputs, target = self._teacher_forcing(tokens, direction, memory.device)
            out, states, alphas = self.branch(direction).decode(memory, memory_mask, inputs, target != IGNORE_INDEX)
            logits.append(out)
            targets.append(target)
            hidden.append(states)
            attention.append(alphas)
            directions += [direction] * len(tokens)
        return DecoderOutput(logits=torch.cat(logits), targets=torch.cat(targets), hidden=torch.cat(hidden),
                             directions=directions, extras={"attention": torch.cat(attention)})

    def teacher_forced(self, memory: torch.Tensor, memory_mask: torch.Tensor, tokens: Sequence[Sequence[int]],
                       direction: str = "l2r") -> tuple[torch.Tensor, torch.Tensor]:
        branch = self.branch(direction)
        inputs, targets = self._teacher_forcing(tokens, direction, memory.device)
        logits, _, _ = branch.decode(memory, memory_mask, inputs, targets != IGNORE_INDEX)
        return logits, targets

    # --- incremental decoding -----------------------------------------------------------------------------------
    def init_state(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                   direction: str | Sequence[str] = "l2r") -> ABMDecoderState:
        if not isinstance(direction, str):
            kinds = set(direction)
            if len(kinds) != 1:
                raise ValueError("abm decoder: the two directions have their own weights; decode them in separate "
                                 f"batches (got directions {sorted(kinds)})")
            direction = kinds.pop()
        direction_tokens(self.sos_id, self.eos_id, direction)  # validates the direction
        branch = self.branch(direction)
        mask = memory_mask.bool()
        n = memory.shape[0]
        return ABMDecoderState(direction=direction, memory=memory, keys=branch.attention.keys(memory),
                               memory_mask=mask, kernel=branch.attention.coverage_kernel(),
                               memory_row=torch.arange(n, device=memory.device),
                               hidden=branch.initial_hidden(memory, mask),
                               coverage=memory.new_zeros(n, *memory.shape[2:]))

    def step(self, state: ABMDecoderState, last_tokens: torch.Tensor) -> tuple[torch.Tensor, ABMDecoderState]:
        """Logits [N,V] of the next token given the previous one [N]: one step of both GRUs and the attention."""
        branch = self.branch(state.direction)
        if state.one_row_per_image:
            memory, keys, mask = state.memory, state.keys, state.memory_mask
        else:
            rows = state.memory_row
            memory, keys, mask = (t.index_select(0, rows) for t in (state.memory, state.keys, state.memory_mask))
        embedded = branch.embedding(last_tokens)
        h1 = branch.gru1(state.hidden, branch.gru1_input(embedded))
        context, attention = branch.attention(h1, memory, keys, mask, state.coverage, state.kernel)
        h2 = branch.gru2(h1, context)
        logits = branch.output(context, h2, embedded)
        return logits, replace(state, hidden=h2, coverage=state.coverage + attention)

    def reorder_state(self, state: ABMDecoderState, index: torch.Tensor) -> ABMDecoderState:
        """Row i of the result is row ``index[i]``; the per-image memory stays put."""
        return replace(state, memory_row=state.memory_row.index_select(0, index),
                       hidden=state.hidden.index_select(0, index), coverage=state.coverage.index_select(0, index),
                       one_row_per_image=False)


def _init_weights(module: nn.Module, init_weight: Callable[[torch.Tensor], torch.Tensor],
                  packed: Sequence[nn.Module] = ()) -> None:
    """``init_weight`` on every conv/linear weight under ``module``, biases 0. ``packed``: linears holding GATES
    stacked matrices, initialised one gate at a time (fans of the official separate layers)."""
    with torch.no_grad():
        for sub in module.modules():
            if not isinstance(sub, (nn.Linear, nn.Conv2d)):
                continue
            if any(sub is p for p in packed):
                for gate in sub.weight.chunk(GATES, dim=0):
                    init_weight(gate)
            else:
                init_weight(sub.weight)
            if sub.bias is not None:
                sub.bias.zero_()
