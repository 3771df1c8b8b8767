"""CoMER's decoder: a BTTR-style transformer whose cross-attention is refined by coverage (Zhao & Gao, ECCV 2022).

Faithful to the official ``comer/model/decoder.py`` and ``transformer/*.py`` (and to HMER-MTL's fork with CBAM):

- input: ``Embedding -> LayerNorm -> + WordPosEnc -> LayerNorm``;
- post-LN decoder layers (self-attention with a causal + ``<pad>`` key mask, cross-attention on the image memory
  with its padding mask, ReLU feed-forward, dropout 0.3 also on the attention weights);
- ONE :class:`AttentionRefinement` shared by all layers and unused in the first: layer ``i > 0`` computes its
  cross-attention A = softmax(E), builds the coverage of every step t as the sum over steps s < t of
  [A_{i-1} (the previous layer's refined attention, "cross coverage"); A (this layer's own, "self coverage")],
  and attends with softmax(E - ARM(coverage)); that refined attention is the next layer's cross coverage;
- training stacks the L2R and R2L rows of every sample in one 2B batch, as the official ``to_bi_tgt_out``.

Incremental decoding keeps, per layer, the running sums of its past unrefined and refined attention maps, so a
step costs the same at step 100 as at step 1 (the official beam search re-decodes the whole prefix, ARM included,
at every step), plus the usual self-attention key/value cache; cross-attention keys/values are projected once.
In eval mode the ARM's BatchNorm uses running statistics, so refining one step alone gives the numbers of refining
all steps at once.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..sequence import DecoderOutput, direction_tokens, teacher_forcing_tensors
from ..posenc import WordPosEnc
from ..registry import DECODERS
from .attention_refinement import AttentionRefinement
from .base import SequenceDecoder, stacked_bidirectional_forward
from .bttr import MultiheadAttention, TransformerDecoderLayer

# this layer's unrefined attention [N,H,L,S] -> the correction [N,H,L,S] to subtract from its attention logits
Refiner = Callable[[torch.Tensor], torch.Tensor]


def refined_cross_attention(attn: MultiheadAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            key_valid: torch.Tensor, refine: Refiner | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CoMER's cross-attention. q [N,H,L,hd], k/v [N,H,S,hd], key_valid [N,1,1,S] (True = may attend).

    ``refine``: None, or a function of this layer's unrefined attention [N,H,L,S] returning the logit correction
    [N,H,L,S] to subtract. Returns (output [N,L,d], unrefined attention, attention used for the values), both
    attentions after dropout, as the official code feeds them to the ARM and the next layer.
    """
    # the official scales q before the product (the order matters at 1e-6 only, but costs nothing to keep)
    scores = torch.matmul(q * attn.head_dim ** -0.5, k.transpose(-2, -1))
    dropout_p = attn.dropout if attn.training else 0.0

    def masked_softmax(logits: torch.Tensor) -> torch.Tensor:
        weights = torch.softmax(logits.masked_fill(~key_valid, float("-inf")), dim=-1)
        return F.dropout(weights, p=dropout_p, training=attn.training)

    raw = masked_softmax(scores)
    used = raw if refine is None else masked_softmax(scores - refine(raw))
    out = torch.matmul(used.to(v.dtype), v)
    n, _, length, _ = out.shape
    return attn.out_proj(out.transpose(1, 2).reshape(n, length, attn.d_model)), raw, used


class CoMERDecoderLayer(TransformerDecoderLayer):
    """Post-LN decoder layer; parameter names as in torch's ``TransformerDecoderLayer`` (and the official one).
    Only the forward differs from BTTR's layer: the cross-attention takes the refinement."""

    def forward(self, x: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor, self_mask: torch.Tensor,
                cross_valid: torch.Tensor, refine: Refiner | None = None, past_k: torch.Tensor | None = None,
                past_v: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N,L,d] -> (x', self-attention keys, values incl. the past, unrefined attention, used attention)."""
        q, k, v = self.self_attn.project_all(x)
        if past_k is not None:
            k = torch.cat((past_k, k), dim=2)
            v = torch.cat((past_v, v), dim=2)
        x = self.norm1(x + self.dropout1(self.self_attn.attend(q, k, v, self_mask)))
        q = self.multihead_attn.project_query(x)
        out, raw, used = refined_cross_attention(self.multihead_attn, q, cross_k, cross_v, cross_valid, refine)
        x = self.norm2(x + self.dropout2(out))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        x = self.norm3(x + self.dropout3(ff))
        return x, k, v, raw, used


@dataclass
class CoMERDecoderState:
    """Incremental-decoding state; every tensor has the rows N (images x beams) first.

    cross_k/cross_v: per layer [N,H,S,hd], projected once. cross_valid: [N,1,1,S] (True = may attend).
    memory_pad: [N,h,w] True = padding (the ARM's mask). self_k/self_v: per layer [N,H,t,hd]. self_pad: [N,t]
    True where the input token was ``<pad>``. raw_sum/used_sum: per layer [N,H,S], the sums over the past steps
    of the layer's unrefined attention (self coverage) and of the attention it used (the next layer's cross
    coverage). position: t, the next input's position. direction: of all rows, or of each row.
    """

    cross_k: list[torch.Tensor]
    cross_v: list[torch.Tensor]
    cross_valid: torch.Tensor
    memory_pad: torch.Tensor
    self_k: list[torch.Tensor]
    self_v: list[torch.Tensor]
    self_pad: torch.Tensor
    raw_sum: list[torch.Tensor]
    used_sum: list[torch.Tensor]
    position: int
    direction: str | list[str]


@DECODERS.register("comer")
class CoMERDecoder(SequenceDecoder):
    """CoMER's bidirectional transformer decoder with attention refinement.

    memory [B,h,w,d] (channels last, e.g. from ``comer_projection``) + mask [B,h,w] (True = pad).
    ``dc``: the ARM's hidden channels. ``cross_coverage`` / ``self_coverage``: the official switches (both on is
    CoMER's "Fusion"; both off removes the ARM, leaving BTTR's attention with CoMER's input stack).
    ``cbam``: put a CBAM in the ARM (HMER-MTL), channel ratio ``cbam_ratio``, spatial kernel ``cbam_kernel``.
    ``cbam_mask_aware``: false (faithful) lets the CBAM pools see padded positions as the official code does, so
    results depend on how much padding a batch has; true excludes padding from them (same parameters).
    ``max_positions``: length of the word position table (official: 500).
    """

    # one set of weights for both directions (the direction only picks the start token), so L2R and R2L beams
    # share a batch, as in the official search
    supports_mixed_directions = True

    def __init__(self, in_channels: int, vocab_size: int, pad_id: int | None, sos_id: int, eos_id: int,
                 d_model: int = 256, nhead: int = 8, num_layers: int = 3, dim_feedforward: int = 1024,
                 dropout: float = 0.3, dc: int = 32, cross_coverage: bool = True, self_coverage: bool = True,
                 cbam: bool = False, cbam_ratio: int = 2, cbam_kernel: int = 7, cbam_mask_aware: bool = False,
                 max_positions: int = 500):
        super().__init__()
        if in_channels != d_model:
            raise ValueError(f"comer decoder: its memory has {in_channels} channels but d_model is {d_model}; use "
                             f"a neck that projects the encoder features to d_model (e.g. comer_projection with "
                             f"d_model: {d_model})")
        if pad_id is None:
            raise ValueError("comer decoder: the vocabulary has no <pad> token; CoMER pads its inputs with <pad> "
                             "and masks them, so add <pad> to vocab.specials")
        if cbam and not (cross_coverage or self_coverage):
            raise ValueError("comer decoder: cbam sits inside the attention refinement, which is off when "
                             "cross_coverage and self_coverage are both false")
        self.d_model = d_model
        self.nhead = nhead
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.sos_id = sos_id
        self.eos_id = eos_id
        self.cross_coverage = cross_coverage
        self.self_coverage = self_coverage
        self.word_embed = nn.Embedding(vocab_size, d_model)
        self.embed_norm = nn.LayerNorm(d_model)
        self.pos_enc = WordPosEnc(d_model, max_len=max_positions)
        self.input_norm = nn.LayerNorm(d_model)  # CoMER's extra LayerNorm after the position encoding
        self.layers = nn.ModuleList(CoMERDecoderLayer(d_model, nhead, dim_feedforward, dropout)
                                    for _ in range(num_layers))
        self.arm: AttentionRefinement | None = None
        if cross_coverage or self_coverage:
            in_channels_arm = nhead * (int(cross_coverage) + int(self_coverage))
            self.arm = AttentionRefinement(nhead, in_channels_arm, dc=dc, cbam=cbam, cbam_ratio=cbam_ratio,
                                           cbam_kernel=cbam_kernel, cbam_mask_aware=cbam_mask_aware)
        self.proj = nn.Linear(d_model, vocab_size)

    @property
    def memory_padding_invariant(self) -> bool:  # type: ignore[override]
        """Whether a memory padded beyond the image decodes like the image alone (eval mode). Attention is masked
        and the ARM zeroes padding before its per-position 1x1 conv and BatchNorm, and its 5x5 conv sees the zero
        attention of padded positions as it sees its own zero padding; but the faithful CBAM pools over padding."""
        return self.arm is None or self.arm.cbam is None or self.arm.cbam.mask_aware

    # --- shared pieces ----------------------------------------------------------------------------------------
    def _embed(self, inputs: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return self.input_norm(self.pos_enc(self.embed_norm(self.word_embed(inputs)), offset))

    def _cross_key_values(self, memory: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        keys, values = [], []
        for layer in self.layers:
            k, v = layer.multihead_attn.project_key_value(memory)
            keys.append(k)
            values.append(v)
        return keys, values

    def _coverage(self, previous: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """The ARM's input channels, [N,H,...] each -> [N,C,...]: cross coverage first, as the official concat."""
        parts = ([previous] if self.cross_coverage else []) + ([own] if self.self_coverage else [])
        return torch.cat(parts, dim=1)

    def _refine(self, coverage: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """coverage [N,C,L,S] over the memory S = h*w, pad [N,h,w] -> logit correction [N,H,L,S]."""
        n, c, length, _ = coverage.shape
        h, w = pad.shape[1:]
        maps = coverage.transpose(1, 2).reshape(n * length, c, h, w)  # one map per (row, step)
        step_pad = pad[:, None].expand(n, length, h, w).reshape(n * length, h, w)
        out = self.arm(maps, step_pad)
        return out.reshape(n, length, self.nhead, h * w).transpose(1, 2)

    def decode(self, memory: torch.Tensor, mask: torch.Tensor, inputs: torch.Tensor,
               rows_per_image: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass over decoder inputs [N,L] (start token first, ``<pad>``-padded).

        ``rows_per_image``: N = rows_per_image * B, row r uses image r % B (the official [L2R; R2L] stacking of
        a duplicated memory); keys/values are projected once per image. Returns (logits [N,L,V], hidden [N,L,d]).
        """
        b, h, w, d = memory.shape
        pad = mask.bool().repeat(rows_per_image, 1, 1)  # [N,h,w]
        length = inputs.shape[1]
        x = self._embed(inputs)
        causal = torch.ones(length, length, dtype=torch.bool, device=inputs.device).tril()
        self_mask = causal[None, None] & (inputs != self.pad_id)[:, None, None, :]
        cross_valid = (~pad).flatten(1)[:, None, None, :]
        cross_k, cross_v = self._cross_key_values(memory.reshape(b, h * w, d))
        previous: torch.Tensor | None = None  # the attention the previous layer used, [N,H,L,S]
        for layer, k, v in zip(self.layers, cross_k, cross_v):
            refine = None
            if previous is not None and self.arm is not None:  # every layer but the first
                refine = self._teacher_forced_refiner(previous, pad)
            k, v = k.repeat(rows_per_image, 1, 1, 1), v.repeat(rows_per_image, 1, 1, 1)
            x, _, _, _, previous = layer(x, k, v, self_mask, cross_valid, refine)
        return self.proj(x), x

    def _teacher_forced_refiner(self, previous: torch.Tensor, pad: torch.Tensor) -> Refiner:
        """The ARM of a layer over all steps at once, given the previous layer's attention [N,H,L,S]."""
        def refine(raw: torch.Tensor) -> torch.Tensor:
            coverage = self._coverage(previous, raw)
            # exclusive prefix sum over steps: step t sees the attention of steps < t (the official cumsum - x)
            return self._refine(coverage.cumsum(dim=2) - coverage, pad)

        return refine

    def _incremental_refiner(self, previous_sum: torch.Tensor, own_sum: torch.Tensor, pad: torch.Tensor) -> Refiner:
        """The ARM of a layer at one step, from the attention sums [N,H,S] over the steps before it."""
        def refine(raw: torch.Tensor) -> torch.Tensor:
            coverage = self._coverage(previous_sum, own_sum)[:, :, None]  # [N,C,1,S]
            return self._refine(coverage.to(raw.dtype), pad)

        return refine

    # --- teacher forcing ----------------------------------------------------------------------------------------
    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                tokens: Sequence[Sequence[int]]) -> DecoderOutput:
        """CoMER's training pass: L2R rows then R2L rows of every sample in one 2B batch (``to_bi_tgt_out``)."""
        return stacked_bidirectional_forward(self, memory, memory_mask, tokens)

    def teacher_forced(self, memory: torch.Tensor, memory_mask: torch.Tensor, tokens: Sequence[Sequence[int]],
                       direction: str = "l2r") -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = teacher_forcing_tensors(tokens, direction, self.sos_id, self.eos_id, self.pad_id,
                                                  memory.device)
        logits, _ = self.decode(memory, memory_mask, inputs)
        return logits, targets

    def prefix_logits(self, memory: torch.Tensor, memory_mask: torch.Tensor, inputs: torch.Tensor,
                      direction: str | Sequence[str] = "l2r") -> torch.Tensor:
        """Full pass over decoder inputs [N,t] as the official search runs it every step (benchmark mode)."""
        logits, _ = self.decode(memory, memory_mask, inputs)
        return logits

    # --- incremental decoding -----------------------------------------------------------------------------------
    def init_state(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                   direction: str | Sequence[str] = "l2r") -> CoMERDecoderState:
        """One row per memory row. ``direction``: one for all rows, or one per row (it only decides the start
        token, which the caller feeds, so both kinds of rows can share a batch)."""
        directions = [direction] if isinstance(direction, str) else list(direction)
        for one in directions:
            direction_tokens(self.sos_id, self.eos_id, one)  # validates the direction
        if not isinstance(direction, str) and len(directions) != memory.shape[0]:
            raise ValueError(f"init_state: {len(directions)} directions for {memory.shape[0]} memory rows")
        b, h, w, d = memory.shape
        pad = memory_mask.bool()
        cross_k, cross_v = self._cross_key_values(memory.reshape(b, h * w, d))
        head_dim = self.d_model // self.nhead
        empty = [k.new_empty(b, self.nhead, 0, head_dim) for k in cross_k]
        # attention sums are kept in float32 so long decodes under autocast do not drift
        zeros = [torch.zeros(b, self.nhead, h * w, device=memory.device) for _ in self.layers]
        return CoMERDecoderState(cross_k=cross_k, cross_v=cross_v, cross_valid=(~pad).flatten(1)[:, None, None, :],
                                 memory_pad=pad, self_k=empty, self_v=list(empty),
                                 self_pad=torch.zeros(b, 0, dtype=torch.bool, device=memory.device),
                                 raw_sum=zeros, used_sum=[z.clone() for z in zeros], position=0,
                                 direction=direction if isinstance(direction, str) else directions)

    def step(self, state: CoMERDecoderState, last_tokens: torch.Tensor) -> tuple[torch.Tensor, CoMERDecoderState]:
        """Logits [N,V] of the next token given the previous one [N]; costs the same at every step."""
        x = self._embed(last_tokens[:, None], offset=state.position)  # [N,1,d]
        self_pad = torch.cat((state.self_pad, (last_tokens == self.pad_id)[:, None]), dim=1)
        self_mask = (~self_pad)[:, None, None, :]  # the official key padding mask also hides <pad> inputs
        new_k, new_v, raw_sum, used_sum = [], [], [], []
        for i, layer in enumerate(self.layers):
            refine = None
            if i > 0 and self.arm is not None:
                # the sums in ``state`` cover the past steps only: the exclusive prefix sum of teacher forcing
                refine = self._incremental_refiner(state.used_sum[i - 1], state.raw_sum[i], state.memory_pad)
            x, k, v, raw, used = layer(x, state.cross_k[i], state.cross_v[i], self_mask, state.cross_valid, refine,
                                       past_k=state.self_k[i], past_v=state.self_v[i])
            new_k.append(k)
            new_v.append(v)
            raw_sum.append(state.raw_sum[i] + raw[:, :, 0].float())
            used_sum.append(state.used_sum[i] + used[:, :, 0].float())
        state = replace(state, self_k=new_k, self_v=new_v, self_pad=self_pad, raw_sum=raw_sum, used_sum=used_sum,
                        position=state.position + 1)
        return self.proj(x[:, 0]), state

    def reorder_state(self, state: CoMERDecoderState, index: torch.Tensor) -> CoMERDecoderState:
        """Keep/duplicate rows: row i of the result is row ``index[i]`` of ``state`` (beam search bookkeeping)."""
        def pick(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.index_select(0, index) for t in tensors]

        return replace(state, cross_k=pick(state.cross_k), cross_v=pick(state.cross_v),
                       cross_valid=state.cross_valid.index_select(0, index),
                       memory_pad=state.memory_pad.index_select(0, index), self_k=pick(state.self_k),
                       self_v=pick(state.self_v), self_pad=state.self_pad.index_select(0, index),
                       raw_sum=pick(state.raw_sum), used_sum=pick(state.used_sum),
                       direction=state.direction if isinstance(state.direction, str)
                       else [state.direction[i] for i in index.tolist()])
