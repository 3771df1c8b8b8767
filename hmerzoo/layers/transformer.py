"""The post-LN transformer decoder layer of BTTR and CoMER, with a hook where CoMER's attention refinement plugs in."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import MultiheadAttention
from .memory_layout import RowLayout

# (the layer's cross-attention module, queries x [N,L,d], memory keys/values, memory mask, row layout or None)
#   -> (output [N,L,d], anything the caller wants back from the layer, e.g. CoMER's attention maps)
CrossAttention = Callable[[MultiheadAttention, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None,
                           "RowLayout | None"], tuple[torch.Tensor, Any]]


class TransformerDecoderLayer(nn.Module):
    """Post-LN decoder layer, numerically the same as ``torch.nn.TransformerDecoderLayer(norm_first=False)``.

    Parameter names mirror torch's layer, so official checkpoints convert by renaming prefixes.
    """

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
                past_v: torch.Tensor | None = None, cross_layout: RowLayout | None = None,
                cross_attention: CrossAttention | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
        """x [N,L,d] -> (x', self-attention keys, values including ``past_k``/``past_v``, the hook's extra).

        ``cross_layout``: rows read the memory rows of ``cross_k``/``cross_v`` [M,...] it names (many rows per
        image: beam search, rescoring); None: row i reads row i. ``cross_attention``: replaces the plain
        cross-attention (CoMER's refined one); its extra is returned (None without a hook).
        """
        q, k, v = self.self_attn.project_all(x)
        if past_k is not None:
            k = torch.cat((past_k, k), dim=2)
            v = torch.cat((past_v, v), dim=2)
        x = self.norm1(x + self.dropout1(self.self_attn.attend(q, k, v, self_mask)))
        if cross_attention is None:
            cross, extra = self.multihead_attn.attend_memory(x, cross_k, cross_v, cross_mask, cross_layout), None
        else:
            cross, extra = cross_attention(self.multihead_attn, x, cross_k, cross_v, cross_mask, cross_layout)
        x = self.norm2(x + self.dropout2(cross))
        ff = self.linear2(self.dropout(F.relu(self.linear1(x))))
        x = self.norm3(x + self.dropout3(ff))
        return x, k, v, extra
