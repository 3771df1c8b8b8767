"""Multi-head attention with torch's parameter layout, split into projections and attention so that keys/values
can be projected once and cached, and so that many query rows can share one memory row's keys/values."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .memory_layout import RowLayout


class MultiheadAttention(nn.Module):
    """Multi-head attention with torch's parameter layout (packed ``in_proj_weight`` = [W_q; W_k; W_v]).

    Tensors between projection and attention are [N, heads, length, head_dim].
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
        # off (None) unless a caller wants the attention maps (attention pictures): a list that ``attend`` appends
        # each call's weights [N,H,L,S] to. Not a parameter or buffer, so the state_dict is unchanged.
        self.recorded: list[torch.Tensor] | None = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch.nn.MultiheadAttention's initialisation, so training from scratch starts like the official code
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, _ = x.shape
        return x.view(n, length, self.nhead, self.head_dim).transpose(1, 2)

    def merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[N,H,L,hd] -> [N,L,d] through the output projection."""
        n, _, length, _ = x.shape
        return self.out_proj(x.transpose(1, 2).reshape(n, length, self.d_model))

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
        if self.recorded is not None:
            self.recorded.append(attention_weights(q, k, mask).detach())
        return self.merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p))

    def attend_grouped(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                       layout: RowLayout) -> torch.Tensor:
        """Queries x [N,L,d] of rows that read the memory row ``layout`` gives them: k/v [M,H,S,hd], mask [M,1,1,S].

        The queries are laid out as a grid [M, width x L] (memory row x slot and position), so every row attends to
        its own image's keys/values without them being copied per row. Returns [N,L,d].
        """
        n, length, d = x.shape
        num_memory = k.shape[0]
        q = F.linear(x, self.in_proj_weight[:d], self.in_proj_bias[:d])
        grid = layout.to_grid(q, num_memory)
        grid = grid.view(num_memory, layout.width * length, self.nhead, self.head_dim).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(grid, k, v, attn_mask=mask, dropout_p=dropout_p)  # [M,H,width*L,hd]
        out = layout.from_grid(out.transpose(1, 2).reshape(num_memory, layout.width, length, d))
        return self.out_proj(out)

    def attend_memory(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      layout: RowLayout | None = None) -> torch.Tensor:
        """Cross-attention of x [N,L,d] to projected memory: row i reads memory row i (``layout`` None) or the
        memory row ``layout`` gives it."""
        if layout is None:
            return self.attend(self.project_query(x), k, v, mask)
        return self.attend_grouped(x, k, v, mask, layout)


def attention_weights(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The weights SDPA uses (no dropout): softmax(q k^T / sqrt(hd)) with the bool mask (True = may attend),
    [N,H,L,S]; SDPA itself never returns them."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1)
