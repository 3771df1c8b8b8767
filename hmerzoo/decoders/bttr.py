"""BTTR's decoder: one post-LN transformer decoder shared by both directions (Zhao et al., ICDAR 2021).

Faithful to the official ``bttr/model/decoder.py``: ``Embedding -> LayerNorm -> + WordPosEnc``, a stack of
torch-style ``TransformerDecoderLayer`` s (post-LN, ReLU, dropout 0.3 also on the attention weights), a causal
self-attention mask plus a key padding mask on ``<pad>`` inputs, a memory key padding mask from the image mask,
and ``Linear(d_model -> vocab)``. Training stacks the L2R and R2L rows into one 2B batch.

The layers are written here (not ``nn.TransformerDecoder``) so that decoding can be incremental: the
cross-attention keys/values are projected once per image and each step appends one self-attention key/value per
layer instead of re-running the prefix (the official beam search re-decodes the whole prefix every step).
Parameter names mirror torch's ``TransformerDecoderLayer`` so official checkpoints convert by renaming prefixes.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..sequence import DecoderOutput, direction_tokens, sequence_log_likelihood, teacher_forcing_tensors
from ..posenc import WordPosEnc
from ..registry import DECODERS
from .base import SequenceDecoder, length_chunks, stacked_bidirectional_forward


class MultiheadAttention(nn.Module):
    """Multi-head attention with torch's parameter layout (packed ``in_proj_weight`` = [W_q; W_k; W_v]).

    Split into projection and attention so that keys/values can be projected once and cached.
    Tensors between the two are [N, heads, length, head_dim].
    """

    def __init__(self, d_model: int, nhead: int, dropout: float):
        super().__init__()
        if d_model % nhead != 0:
            raise ValueError(f"attention: d_model {d_model} is not divisible by nhead {nhead}")
        self.d_model = d_model
        self.nhead = nhead
        self.head_dim = d_model // nhead
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch.nn.MultiheadAttention's initialisation, so training from scratch starts like the official code
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        return x.view(n, length, self.nhead, self.head_dim).transpose(1, 2)

    def project_query(self, x: torch.Tensor) -> torch.Tensor:
        d = self.d_model
        return self._split_heads(F.linear(x, self.in_proj_weight[:d], self.in_proj_bias[:d]))

    def project_key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.d_model
        k, v = F.linear(x, self.in_proj_weight[d:], self.in_proj_bias[d:]).chunk(2, dim=-1)
        return self._split_heads(k), self._split_heads(v)

    def project_all(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self._split_heads(q), self._split_heads(k), self._split_heads(v)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """q [N,H,L,hd], k/v [N,H,S,hd], bool mask (True = may attend) broadcastable to [N,H,L,S] -> [N,L,d].

        A bool mask keeps this independent of the compute dtype (autocast); SDPA turns it into -inf scores, as
        torch's MultiheadAttention does with BTTR's bool masks.
        """
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        n, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(n, length, self.d_model))

    def attend_grouped(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       layout: "RowLayout") -> torch.Tensor:
        """Queries x [N,L,d] of rows that read the memory row ``layout`` gives them: k/v [M,H,S,hd], mask [M,1,1,S].

        The queries are laid out as a grid [M, width x L] (memory row x slot and position), so every row attends to
        its own image's keys/values without them being copied per row (beam search keeps many rows per image).
        Returns [N,L,d].
        """
        n, length, d = x.shape
        num_memory = k.shape[0]
        q = F.linear(x, self.in_proj_weight[:d], self.in_proj_bias[:d])
        grid = q.new_zeros(num_memory, layout.width, length, d)
        grid[layout.memory_row, layout.slot] = q
        grid = grid.view(num_memory, layout.width * length, self.nhead, self.head_dim).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(grid, k, v, attn_mask=mask, dropout_p=dropout_p)  # [M,H,width*L,hd]
        out = out.transpose(1, 2).reshape(num_memory, layout.width, length, d)[layout.memory_row, layout.slot]
        return self.out_proj(out)


class TransformerDecoderLayer(nn.Module):
    """Post-LN decoder layer, numerically the same as ``torch.nn.TransformerDecoderLayer(norm_first=False)``."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor, self_mask: torch.Tensor | None,
                cross_mask: torch.Tensor | None, past_k: torch.Tensor | None = None,
                past_v: torch.Tensor | None = None,
                cross_layout: "RowLayout | None" = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N,L,d] -> (x', self-attention keys, values including ``past_k``/``past_v``).

        ``cross_layout``: rows read the memory rows of ``cross_k``/``cross_v`` [M,...] it names (many rows per
        image: beam search, rescoring); None: row i reads row i.
        """
        q, k, v = self.self_attn.project_all(x)
        if past_k is not None:
            k = torch.cat((past_k, k), dim=2)
            v = torch.cat((past_v, v), dim=2)
        x = self.norm1(x + self.dropout1(self.self_attn.attend(q, k, v, self_mask)))
        if cross_layout is None:
            cross = self.multihead_attn.attend(self.multihead_attn.project_query(x), cross_k, cross_v, cross_mask)
        else:
            cross = self.multihead_attn.attend_grouped(x, cross_k, cross_v, cross_mask, cross_layout)
        x = self.norm2(x + self.dropout2(cross))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        x = self.norm3(x + self.dropout3(ff))
        return x, k, v


@dataclass
class RowLayout:
    """Where each hypothesis row sits in a [memory rows x width] grid: its memory row and its slot there.

    Beam search keeps many rows per image; laying their queries out per image lets cross-attention read each
    image's keys/values once instead of gathering them for every row at every step.
    """

    memory_row: torch.Tensor  # [N] long
    slot: torch.Tensor  # [N] long, distinct within a memory row
    width: int  # slots per memory row (the most rows any memory row has)

    @classmethod
    def one_per_memory(cls, num_memory: int, device: torch.device) -> "RowLayout":
        index = torch.arange(num_memory, device=device)
        return cls(memory_row=index, slot=torch.zeros_like(index), width=1)

    @classmethod
    def of(cls, memory_row: torch.Tensor, num_memory: int) -> "RowLayout":
        counts = torch.bincount(memory_row, minlength=num_memory)
        order = torch.argsort(memory_row, stable=True)  # rows of one memory row keep their relative order
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(memory_row)
        slot[order] = torch.arange(memory_row.numel(), device=memory_row.device) - starts[memory_row[order]]
        return cls(memory_row=memory_row, slot=slot, width=max(int(counts.max()), 1) if memory_row.numel() else 1)


@dataclass
class CrossMemory:
    """The cross-attention keys/values of the images that the live rows read.

    keys/values: per layer [A,H,S',hd]; mask: [A,1,1,S'] (True = may attend); images: [A], which memory rows of
    the full set these are. Memory positions masked for every one of them are dropped (a batch of small images
    padded to a big one's size), and images without live rows are left out, so attention does no work for them.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    images: torch.Tensor

    @classmethod
    def select(cls, keys: list[torch.Tensor], values: list[torch.Tensor], mask: torch.Tensor,
               images: torch.Tensor) -> "CrossMemory":
        mask = mask.index_select(0, images)
        keys = [k.index_select(0, images) for k in keys]
        values = [v.index_select(0, images) for v in values]
        used = mask[:, 0, 0, :].any(0)
        if not bool(used.all()):
            positions = used.nonzero().squeeze(1)
            mask = mask.index_select(3, positions)
            keys = [k.index_select(2, positions) for k in keys]
            values = [v.index_select(2, positions) for v in values]
        return cls(keys=keys, values=values, mask=mask, images=images)


@dataclass
class BTTRDecoderState:
    """Incremental-decoding state. Rows N are hypotheses (images x beams); memory rows M are the images.

    memory_k/memory_v: per layer [M,H,S,hd], projected once per image; memory_mask: [M,1,1,S]. cross: the part of
    them the live rows read, gathered again only when the set of images with live rows changes (never per row).
    row_image: [N] the memory row each row reads; layout: where each row's query sits in ``cross``'s grid.
    self_k/self_v: per layer [N,H,t,hd], one entry appended per step. self_pad: [N,t] True where the input token
    was ``<pad>`` (masked as a key, as the official code does). position: t, the next input's position.
    Masks are bool with True = may attend. direction: of every memory row (one string when all share it).
    """

    memory_k: list[torch.Tensor]
    memory_v: list[torch.Tensor]
    memory_mask: torch.Tensor
    cross: CrossMemory
    row_image: torch.Tensor
    layout: RowLayout
    self_k: list[torch.Tensor]
    self_v: list[torch.Tensor]
    self_pad: torch.Tensor
    position: int
    direction: str | list[str]


@DECODERS.register("bttr")
class BTTRDecoder(SequenceDecoder):
    """BTTR's bidirectional transformer decoder.

    memory [B,h,w,d] (channels last, from a neck) + mask [B,h,w] (True = pad). Training rows: B L2R then B R2L.
    ``max_positions``: length of the word position table (official: 500), the longest input it can decode.
    """

    # one set of weights for both directions (the direction only picks the start token), so L2R and R2L beams
    # share a batch; cross-attention is masked, so a memory padded beyond the image decodes like the image alone
    supports_mixed_directions = True
    memory_padding_invariant = True

    def __init__(self, in_channels: int, vocab_size: int, pad_id: int | None, sos_id: int, eos_id: int,
                 d_model: int = 256, nhead: int = 8, num_layers: int = 3, dim_feedforward: int = 1024,
                 dropout: float = 0.3, max_positions: int = 500):
        super().__init__()
        if in_channels != d_model:
            raise ValueError(f"bttr decoder: its memory has {in_channels} channels but d_model is {d_model}; "
                             "use a neck that projects the encoder features to d_model (e.g. bttr_projection "
                             f"with d_model: {d_model})")
        if pad_id is None:
            raise ValueError("bttr decoder: the vocabulary has no <pad> token; BTTR pads its inputs with <pad> "
                             "and masks them, so add <pad> to vocab.specials")
        self.d_model = d_model
        self.nhead = nhead
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.sos_id = sos_id
        self.eos_id = eos_id
        self.word_embed = nn.Embedding(vocab_size, d_model)
        self.embed_norm = nn.LayerNorm(d_model)
        self.pos_enc = WordPosEnc(d_model, max_len=max_positions)
        self.layers = nn.ModuleList(TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout)
                                    for _ in range(num_layers))
        self.proj = nn.Linear(d_model, vocab_size)

    # --- shared pieces ----------------------------------------------------------------------------------------
    @staticmethod
    def _flatten_memory(memory: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B,h,w,d], [B,h,w] -> [B,h*w,d], [B,h*w] (row-major, as the official encoder flattens)."""
        if memory.dim() == 4:
            memory = memory.flatten(1, 2)
            mask = mask.flatten(1)
        return memory, mask.bool()

    def _embed(self, inputs: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return self.pos_enc(self.embed_norm(self.word_embed(inputs)), offset)

    def _cross_key_values(self, memory: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        keys, values = [], []
        for layer in self.layers:
            k, v = layer.multihead_attn.project_key_value(memory)
            keys.append(k)
            values.append(v)
        return keys, values

    def decode(self, memory: torch.Tensor, mask: torch.Tensor, inputs: torch.Tensor, rows_per_image: int = 1,
               memory_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass over given decoder inputs [N,L] (start token first, ``<pad>``-padded).

        Which image row r reads: ``memory_index[r]`` when given (rescoring many hypotheses of a few images), else
        image r % B with N = rows_per_image * B (BTTR's [L2R; R2L] stacking). Either way the memory's keys/values
        are projected once per image. Returns (logits [N,L,V], hidden [N,L,d]).
        """
        memory, mask = self._flatten_memory(memory, mask)
        cross_k, cross_v = self._cross_key_values(memory)
        cross_mask = (~mask)[:, None, None, :]
        if memory_index is not None:
            return self._decode_rows(inputs, cross_k, cross_v, cross_mask, memory_index)
        x = self._embed(inputs)
        self_mask = self._self_mask(inputs)
        cross_mask = cross_mask.repeat(rows_per_image, 1, 1, 1)
        for layer, k, v in zip(self.layers, cross_k, cross_v):
            k, v = k.repeat(rows_per_image, 1, 1, 1), v.repeat(rows_per_image, 1, 1, 1)
            x, _, _ = layer(x, k, v, self_mask, cross_mask)
        return self.proj(x), x

    def _self_mask(self, inputs: torch.Tensor) -> torch.Tensor:
        """Causal mask plus the official key padding mask on ``<pad>`` inputs, [N,1,L,L] (True = may attend)."""
        length = inputs.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=inputs.device).tril()
        return causal[None, None] & (inputs != self.pad_id)[:, None, None, :]

    def _decode_rows(self, inputs: torch.Tensor, memory_k: list[torch.Tensor], memory_v: list[torch.Tensor],
                     memory_mask: torch.Tensor, memory_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass where row r reads memory row ``memory_index[r]`` of projected keys/values [M,...]:
        the rows' queries are grouped per image, so the keys/values are never copied per row."""
        images = torch.unique(memory_index)
        cross = CrossMemory.select(memory_k, memory_v, memory_mask, images)
        layout = RowLayout.of(torch.searchsorted(images, memory_index), images.numel())
        x = self._embed(inputs)
        self_mask = self._self_mask(inputs)
        for layer, k, v in zip(self.layers, cross.keys, cross.values):
            x, _, _ = layer(x, k, v, self_mask, cross.mask, cross_layout=layout)
        return self.proj(x), x

    # --- teacher forcing ----------------------------------------------------------------------------------------
    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                tokens: Sequence[Sequence[int]]) -> DecoderOutput:
        """BTTR's training pass: L2R and R2L rows of every sample in one 2B batch, sharing the image memory."""
        return stacked_bidirectional_forward(self, memory, memory_mask, tokens)

    def teacher_forced(self, memory: torch.Tensor, memory_mask: torch.Tensor, tokens: Sequence[Sequence[int]],
                       direction: str = "l2r",
                       memory_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = teacher_forcing_tensors(tokens, direction, self.sos_id, self.eos_id, self.pad_id,
                                                  memory.device)
        logits, _ = self.decode(memory, memory_mask, inputs, memory_index=memory_index)
        return logits, targets

    def log_likelihood(self, memory: torch.Tensor, memory_mask: torch.Tensor, tokens: Sequence[Sequence[int]],
                       direction: str = "l2r", memory_index: torch.Tensor | None = None) -> torch.Tensor:
        # as the base class (sequences of similar length scored together), but each image's keys/values are
        # projected once for all the passes and never copied per sequence
        memory, mask = self._flatten_memory(memory, memory_mask)
        memory_k, memory_v = self._cross_key_values(memory)
        if memory_index is None:
            memory_index = torch.arange(len(tokens), device=memory.device)
        scores = torch.empty(len(tokens), dtype=torch.float32, device=memory.device)
        for chunk in length_chunks([len(seq) for seq in tokens]):
            rows = torch.tensor(chunk, dtype=torch.long, device=memory.device)
            inputs, targets = teacher_forcing_tensors([tokens[i] for i in chunk], direction, self.sos_id,
                                                      self.eos_id, self.pad_id, memory.device)
            logits, _ = self._decode_rows(inputs, memory_k, memory_v, (~mask)[:, None, None, :],
                                          memory_index.index_select(0, rows))
            scores[rows] = sequence_log_likelihood(logits, targets)
        return scores

    def prefix_logits(self, memory: torch.Tensor, memory_mask: torch.Tensor, inputs: torch.Tensor,
                      direction: str | Sequence[str] = "l2r") -> torch.Tensor:
        """Full pass over decoder inputs [N,t] as the official search runs it every step (benchmark mode)."""
        logits, _ = self.decode(memory, memory_mask, inputs)
        return logits

    # --- incremental decoding -----------------------------------------------------------------------------------
    def init_state(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                   direction: str | Sequence[str] = "l2r") -> BTTRDecoderState:
        """One hypothesis row per memory row. ``direction``: one for all rows, or one per memory row (the
        direction only decides the start token, which the caller feeds, so both kinds of rows can share a batch)."""
        directions = [direction] if isinstance(direction, str) else list(direction)
        for d in directions:
            direction_tokens(self.sos_id, self.eos_id, d)  # validates the direction
        if not isinstance(direction, str) and len(directions) != memory.shape[0]:
            raise ValueError(f"init_state: {len(directions)} directions for {memory.shape[0]} memory rows")
        memory, mask = self._flatten_memory(memory, memory_mask)
        memory_k, memory_v = self._cross_key_values(memory)
        memory_mask = (~mask)[:, None, None, :]
        n, device = memory.shape[0], memory.device
        images = torch.arange(n, device=device)
        empty = [k.new_empty(n, self.nhead, 0, self.d_model // self.nhead) for k in memory_k]
        return BTTRDecoderState(memory_k=memory_k, memory_v=memory_v, memory_mask=memory_mask,
                                cross=CrossMemory.select(memory_k, memory_v, memory_mask, images),
                                row_image=images, layout=RowLayout.one_per_memory(n, device),
                                self_k=empty, self_v=list(empty),
                                self_pad=torch.zeros(n, 0, dtype=torch.bool, device=device),
                                position=0, direction=direction if isinstance(direction, str) else directions)

    def step(self, state: BTTRDecoderState, last_tokens: torch.Tensor) -> tuple[torch.Tensor, BTTRDecoderState]:
        """Logits [N,V] of the next token given the previous one [N]; attends to the cached prefix only."""
        x = self._embed(last_tokens[:, None], offset=state.position)  # [N,1,d]
        self_pad = torch.cat((state.self_pad, (last_tokens == self.pad_id)[:, None]), dim=1)
        # the official key padding mask also hides <pad> inputs of a hypothesis (only if the model emits <pad>);
        # None when there is none, so attention takes its unmasked path
        self_mask = (~self_pad)[:, None, None, :] if bool(self_pad.any()) else None
        cross = state.cross
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cross.keys[i], cross.values[i], self_mask, cross.mask,
                            past_k=state.self_k[i], past_v=state.self_v[i], cross_layout=state.layout)
            new_k.append(k)
            new_v.append(v)
        state = replace(state, self_k=new_k, self_v=new_v, self_pad=self_pad, position=state.position + 1)
        return self.proj(x[:, 0]), state

    def reorder_state(self, state: BTTRDecoderState, index: torch.Tensor) -> BTTRDecoderState:
        """Keep/duplicate rows: row i of the result is row ``index[i]`` of ``state`` (beam search bookkeeping).

        Only the per-row self-attention cache is gathered every step; the images' cross-attention keys/values
        are gathered again only when the set of images that still have rows changes.
        """
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, index)

        row_image = pick(state.row_image)
        images = torch.unique(row_image)  # sorted
        cross = state.cross
        if images.shape != cross.images.shape or not bool(torch.equal(images, cross.images)):
            cross = CrossMemory.select(state.memory_k, state.memory_v, state.memory_mask, images)
        layout = RowLayout.of(torch.searchsorted(images, row_image), images.numel())
        return replace(state, cross=cross, row_image=row_image, layout=layout,
                       self_k=[pick(t) for t in state.self_k], self_v=[pick(t) for t in state.self_v],
                       self_pad=pick(state.self_pad))
