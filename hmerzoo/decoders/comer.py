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
at every step), plus the usual self-attention key/value cache; cross-attention keys/values are projected once
per image and shared by all its hypotheses (the shared :class:`TransformerSequenceDecoder`'s layout), so the
refined attention below takes the rows' queries grouped per image as plain attention does.
In eval mode the ARM's BatchNorm uses running statistics, so refining one step alone gives the numbers of refining
all steps at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.attention import MultiheadAttention
from ..layers.attention_refinement import AttentionRefinement
from ..layers.memory_layout import RowLayout
from ..layers.transformer import CrossAttention
from ..registry import DECODERS
from ..sequence import to_device
from ..vocab import Vocabulary
from .transformer import TransformerDecoderState, TransformerSequenceDecoder

# this layer's unrefined attention [N,H,L,S] -> the correction [N,H,L,S] to subtract from its attention logits
Refiner = Callable[[torch.Tensor], torch.Tensor]


def refined_cross_attention(refine: Refiner | None) -> CrossAttention:
    """CoMER's cross-attention as the layer's hook. ``refine``: None, or a function of this layer's unrefined
    attention [N,H,L,S] returning the logit correction [N,H,L,S] to subtract. The hook's extra is (unrefined
    attention, attention used for the values) [N,H,L,S], both after dropout, as the official code feeds them to
    the ARM and the next layer.

    With a row layout, k/v [M,H,S,hd] are per image and the rows' queries are laid out per image for the two
    products, so no image's keys/values are copied per row; the attention maps themselves are per row."""
    def attend(attn: MultiheadAttention, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_valid: torch.Tensor | None, layout: RowLayout | None
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        assert key_valid is not None
        # the official scales q before the product (the order matters at 1e-6 only, but costs nothing to keep)
        q = attn.project_query(x) * attn.head_dim ** -0.5  # [N,H,L,hd]
        if layout is None:
            scores = torch.matmul(q, k.transpose(-2, -1))
        else:
            scores = _from_grid(torch.matmul(_to_grid(q, layout, k.shape[0]), k.transpose(-2, -1)), layout)
            key_valid = key_valid.index_select(0, layout.memory_row)
        dropout_p = attn.dropout if attn.training else 0.0

        def masked_softmax(logits: torch.Tensor) -> torch.Tensor:
            weights = torch.softmax(logits.masked_fill(~key_valid, float("-inf")), dim=-1)
            return F.dropout(weights, p=dropout_p, training=attn.training)

        raw = masked_softmax(scores)
        used = raw if refine is None else masked_softmax(scores - refine(raw))
        if attn.recorded is not None:  # attention pictures: the refined map is the one the values are read with
            attn.recorded.append(used.detach())
        if layout is None:
            out = torch.matmul(used.to(v.dtype), v)
        else:
            out = _from_grid(torch.matmul(_to_grid(used.to(v.dtype), layout, v.shape[0]), v), layout)
        return attn.merge_heads(out), (raw, used)

    return attend


def _to_grid(rows: torch.Tensor, layout: RowLayout, num_memory: int) -> torch.Tensor:
    """[N,H,L,X] per row -> [M,H,width*L,X] per memory row (the rows of one image side by side)."""
    _, heads, length, last = rows.shape
    grid = layout.to_grid(rows, num_memory)  # [M,width,H,L,X]
    return grid.transpose(1, 2).reshape(num_memory, heads, layout.width * length, last)


def _from_grid(grid: torch.Tensor, layout: RowLayout) -> torch.Tensor:
    """[M,H,width*L,X] -> [N,H,L,X]."""
    num_memory, heads, _, last = grid.shape
    return layout.from_grid(grid.view(num_memory, heads, layout.width, -1, last).transpose(1, 2))


@dataclass
class CoMERDecoderState(TransformerDecoderState):
    """The shared state plus, per layer, the sums over the past steps of the layer's unrefined attention (self
    coverage) and of the attention it used (the next layer's cross coverage): raw_sum/used_sum [N,H,S], per row.
    They are kept in float32 so long decodes under autocast do not drift."""

    raw_sum: list[torch.Tensor] | None = None
    used_sum: list[torch.Tensor] | None = None


class _TeacherForcedCoverage:
    """The ARM of every layer but the first over all steps at once, from the previous layer's used attention."""

    def __init__(self, decoder: "CoMERDecoder", row_mask: torch.Tensor, keep: torch.Tensor | None):
        self.decoder = decoder
        self.row_mask = row_mask
        self.keep = keep  # [N,1,L,1] 0 at steps whose attention coverage leaves out (coverage_skip), or None
        self.previous: torch.Tensor | None = None  # the attention the previous layer used, [N,H,L,S]

    def cross_attention(self, layer: int) -> CrossAttention:
        if self.previous is None or self.decoder.arm is None:
            return refined_cross_attention(None)
        previous = self.previous

        def refine(raw: torch.Tensor) -> torch.Tensor:
            coverage = self.decoder._coverage(previous, raw)
            if self.keep is not None:
                coverage = coverage * self.keep
            # exclusive prefix sum over steps: step t sees the attention of steps < t (the official cumsum - x)
            return self.decoder._refine(coverage.cumsum(dim=2) - coverage, self.row_mask)

        return refined_cross_attention(refine)

    def after_layer(self, layer: int, extra: Any) -> None:
        self.previous = extra[1]


class _IncrementalCoverage:
    """The ARM of each layer at one step, from the attention sums over the steps before it; collects the sums
    including this step."""

    def __init__(self, decoder: "CoMERDecoder", state: CoMERDecoderState, keep: torch.Tensor | None):
        self.decoder = decoder
        self.state = state
        self.keep = keep  # [N,1,1] 0 where this step's attention stays out of the coverage sums, or None
        self.row_mask = state.image_mask.index_select(0, state.row_image)
        self.raw_sum: list[torch.Tensor] = []
        self.used_sum: list[torch.Tensor] = []

    def cross_attention(self, layer: int) -> CrossAttention:
        if layer == 0 or self.decoder.arm is None:
            return refined_cross_attention(None)
        # the sums in the state cover the past steps only: the exclusive prefix sum of teacher forcing
        previous_sum, own_sum = self.state.used_sum[layer - 1], self.state.raw_sum[layer]

        def refine(raw: torch.Tensor) -> torch.Tensor:
            coverage = self.decoder._coverage(previous_sum, own_sum)[:, :, None]  # [N,C,1,S]
            return self.decoder._refine(coverage.to(raw.dtype), self.row_mask)

        return refined_cross_attention(refine)

    def after_layer(self, layer: int, extra: Any) -> None:
        raw, used = extra[0][:, :, 0].float(), extra[1][:, :, 0].float()
        if self.keep is not None:
            raw, used = raw * self.keep, used * self.keep
        self.raw_sum.append(self.state.raw_sum[layer] + raw)
        self.used_sum.append(self.state.used_sum[layer] + used)


@DECODERS.register("comer")
class CoMERDecoder(TransformerSequenceDecoder):
    """CoMER's bidirectional transformer decoder with attention refinement.

    memory [B,h,w,d] (channels last, e.g. from ``comer_projection``) + mask [B,h,w] (True = pad).
    ``dc``: the ARM's hidden channels. ``cross_coverage`` / ``self_coverage``: the official switches (both on is
    CoMER's "Fusion"; both off removes the ARM, leaving BTTR's attention with CoMER's input stack).
    ``cbam``: put a CBAM in the ARM (HMER-MTL), channel ratio ``cbam_ratio``, spatial kernel ``cbam_kernel``.
    ``cbam_mask_aware``: false (faithful) lets the CBAM pools see padded positions as the official code does, so
    results depend on how much padding a batch has; true excludes padding from them (same parameters).
    ``max_positions``: length of the word position table (official: 500).
    ``coverage_skip``: symbols whose steps' attention the coverage leaves out (PosFormer's implicit attention
    correction: ``{``, ``^``, ``_``, which attend to nothing of their own); needs the vocabulary (injected).
    """

    family = "comer"
    neck_hint = "comer_projection"
    compact_memory = False  # the ARM reads attention maps over the whole h x w memory
    state_class = CoMERDecoderState

    def __init__(self, in_channels: int, vocab_size: int, pad_id: int | None, sos_id: int, eos_id: int,
                 d_model: int = 256, nhead: int = 8, num_layers: int = 3, dim_feedforward: int = 1024,
                 dropout: float = 0.3, dc: int = 32, cross_coverage: bool = True, self_coverage: bool = True,
                 cbam: bool = False, cbam_ratio: int = 2, cbam_kernel: int = 7, cbam_mask_aware: bool = False,
                 max_positions: int = 500, coverage_skip: Sequence[str] = (), vocab: Vocabulary | None = None):
        if cbam and not (cross_coverage or self_coverage):
            raise ValueError("comer decoder: cbam sits inside the attention refinement, which is off when "
                             "cross_coverage and self_coverage are both false")
        super().__init__(in_channels, vocab_size, pad_id, sos_id, eos_id, d_model, nhead, max_positions)
        self.cross_coverage = cross_coverage
        self.self_coverage = self_coverage
        self.input_norm = nn.LayerNorm(d_model)  # CoMER's extra LayerNorm after the position encoding
        self._add_layers(num_layers, dim_feedforward, dropout)
        self.arm: AttentionRefinement | None = None
        if cross_coverage or self_coverage:
            in_channels_arm = nhead * (int(cross_coverage) + int(self_coverage))
            self.arm = AttentionRefinement(nhead, in_channels_arm, dc=dc, cbam=cbam, cbam_ratio=cbam_ratio,
                                           cbam_kernel=cbam_kernel, cbam_mask_aware=cbam_mask_aware)
        self.coverage_skip = list(coverage_skip)
        self._skip_ids: list[int] = []
        if self.coverage_skip:
            if vocab is None:
                raise ValueError("comer decoder: coverage_skip names symbols, which needs the vocabulary")
            missing = [s for s in self.coverage_skip if s not in vocab.tokens]
            if missing:
                raise ValueError(f"comer decoder: coverage_skip symbols not in the vocabulary: {missing}")
            self._skip_ids = [vocab.tokens.index(s) for s in self.coverage_skip]
        self._add_output()

    def _coverage_keep(self, inputs: torch.Tensor | None) -> torch.Tensor | None:
        """[N,L] float: 0 at inputs in ``coverage_skip``, else 1; None when nothing is skipped."""
        if not self._skip_ids or inputs is None:
            return None
        skip = to_device(torch.tensor(self._skip_ids), inputs.device)  # no host wait: the ids are known here
        return (~torch.isin(inputs, skip)).float()

    @property
    def memory_padding_invariant(self) -> bool:  # type: ignore[override]
        """Whether a memory padded beyond the image decodes like the image alone (eval mode). Attention is masked
        and the ARM zeroes padding before its per-position 1x1 conv and BatchNorm, and its 5x5 conv sees the zero
        attention of padded positions as it sees its own zero padding; but the faithful CBAM pools over padding."""
        return self.arm is None or self.arm.cbam is None or self.arm.cbam.mask_aware

    def _embed(self, inputs: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return self.input_norm(super()._embed(inputs, offset))

    def _coverage(self, previous: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
        """The ARM's input channels, [N,H,...] each -> [N,C,...]: cross coverage first, as the official concat."""
        parts = ([previous] if self.cross_coverage else []) + ([own] if self.self_coverage else [])
        return torch.cat(parts, dim=1)

    def _refine(self, coverage: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """coverage [N,C,L,S] over the memory S = h*w, pad [N,h,w] -> logit correction [N,H,L,S]."""
        assert self.arm is not None
        n, c, length, _ = coverage.shape
        h, w = pad.shape[1:]
        maps = coverage.transpose(1, 2).reshape(n * length, c, h, w)  # one map per (row, step)
        step_pad = pad[:, None].expand(n, length, h, w).reshape(n * length, h, w)
        out = self.arm(maps, step_pad)
        return out.reshape(n, length, self.nhead, h * w).transpose(1, 2)

    # --- the shared decoder's hooks -----------------------------------------------------------------------------
    def _layer_hook(self, row_mask: torch.Tensor | None, state: TransformerDecoderState | None,
                    inputs: torch.Tensor | None = None) -> _TeacherForcedCoverage | _IncrementalCoverage:
        keep = self._coverage_keep(inputs)
        if state is None:
            assert row_mask is not None
            return _TeacherForcedCoverage(self, row_mask, None if keep is None else keep[:, None, :, None])
        assert isinstance(state, CoMERDecoderState)
        return _IncrementalCoverage(self, state, None if keep is None else keep[:, :1, None])

    def _initial_row_state(self, num_rows: int, image_mask: torch.Tensor) -> dict[str, Any]:
        size = image_mask[0].numel()
        zeros = [torch.zeros(num_rows, self.nhead, size, device=image_mask.device) for _ in self.layers]
        return {"raw_sum": zeros, "used_sum": [z.clone() for z in zeros]}

    def _step_updates(self, hook: Any) -> dict[str, Any]:
        return {"raw_sum": hook.raw_sum, "used_sum": hook.used_sum}

    def _reorder_rows(self, state: TransformerDecoderState, index: torch.Tensor) -> dict[str, Any]:
        assert isinstance(state, CoMERDecoderState) and state.raw_sum is not None and state.used_sum is not None
        return {"raw_sum": [t.index_select(0, index) for t in state.raw_sum],
                "used_sum": [t.index_select(0, index) for t in state.used_sum]}
