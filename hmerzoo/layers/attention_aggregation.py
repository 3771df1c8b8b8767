"""ABM's Attention Aggregation Module (AAM): coverage attention with multi-scale coverage (Bian et al., AAAI 2022).

Official ``decoder.py::Gru_cond_layer_aam`` (the attention half of ``_step_slice``)::

    e     = v . tanh(U_a ctx + W_a h1 + U_f (Q_11 * beta) + U_f2 (Q_5 * beta)) + b_v
    alpha = exp(e) * mask / sum(exp(e) * mask)          (over the feature map)
    c     = sum(alpha * ctx)

``beta`` is the coverage, the sum of the attention maps of the earlier steps; ``Q_11`` / ``Q_5`` are
``Conv2d(1, 512, 11x11 / 5x5, pad 5 / 2, no bias)``, each followed by its own ``Linear(512 -> attention_dim)``.

Two exact rewrites make it cheaper, with the official parameters kept as they are (so checkpoints convert by
renaming, and training updates the same tensors):

- a conv with one input channel followed by a linear map is one conv: ``U_f (Q * beta) = (U_f Q) * beta + b``, and
  the 5x5 kernel zero-padded to 11x11 sums into the 11x11 one. :meth:`coverage_kernel` builds that single
  ``attention_dim``-channel kernel once per decoding pass; each step then runs one 1-channel convolution instead of
  two convolutions to 512 channels plus two 512x512 projections at every position.
- the softmax subtracts the maximum energy first. The official ``exp`` without it equals this wherever it does not
  overflow (where it overflows it returns NaN); the result is unchanged otherwise.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class AttentionAggregation(nn.Module):
    """Coverage attention over a channels-first feature map, with coverage convolved at several kernel sizes.

    ``in_channels``: D, the feature channels (684); ``hidden_size``: the query state's size (n = 256);
    ``attention_dim``: the energy's hidden size (512); ``coverage_channels``: each coverage conv's output channels
    (official: 512, a literal); ``coverage_kernels``: odd kernel sizes, padded to keep the map's size (11, 5).
    """

    def __init__(self, in_channels: int, hidden_size: int, attention_dim: int = 512, coverage_channels: int = 512,
                 coverage_kernels: Sequence[int] = (11, 5)):
        super().__init__()
        kernels = [int(k) for k in coverage_kernels]
        if not kernels or any(k < 1 or k % 2 == 0 for k in kernels):
            raise ValueError(f"attention aggregation: coverage_kernels must be odd sizes, got {list(coverage_kernels)}")
        self.attention_dim = attention_dim
        self.coverage_kernels = kernels
        self.key_proj = nn.Conv2d(in_channels, attention_dim, kernel_size=1)  # U_a
        self.query_proj = nn.Linear(hidden_size, attention_dim, bias=False)  # W_a
        self.coverage_convs = nn.ModuleList(nn.Conv2d(1, coverage_channels, kernel_size=k, padding=k // 2, bias=False)
                                            for k in kernels)  # Q_11, Q_5
        self.coverage_projs = nn.ModuleList(nn.Linear(coverage_channels, attention_dim)
                                            for _ in kernels)  # U_f, U_f2
        self.energy = nn.Linear(attention_dim, 1)  # v (its bias cancels in the softmax; kept for the checkpoints)

    def keys(self, memory: torch.Tensor) -> torch.Tensor:
        """U_a ctx: [B,D,h,w] -> [B,A,h,w], computed once per image."""
        return self.key_proj(memory)

    def coverage_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight [A,1,K,K], bias [A]) of the one convolution equal to the sum of every scale's conv + projection,
        K the largest kernel size. Built from the parameters, so gradients reach them."""
        size = max(self.coverage_kernels)
        weight = None
        bias = None
        for conv, proj in zip(self.coverage_convs, self.coverage_projs):
            k = conv.kernel_size[0]
            # [A,C] @ [C,k*k]: the projection applied to every kernel tap
            combined = (proj.weight @ conv.weight.flatten(1)).view(self.attention_dim, 1, k, k)
            margin = (size - k) // 2
            combined = F.pad(combined, (margin, margin, margin, margin))
            weight = combined if weight is None else weight + combined
            bias = proj.bias if bias is None else bias + proj.bias
        assert weight is not None and bias is not None
        return weight, bias

    def coverage_features(self, coverage: torch.Tensor,
                          kernel: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """sum_s U_fs (Q_s * beta): coverage [N,h,w] -> [N,A,h,w]. ``kernel``: :meth:`coverage_kernel`'s result
        (pass it to build it once per pass); None computes it, and ``unfused_coverage_features`` is the official
        order of operations (for checks)."""
        weight, bias = kernel if kernel is not None else self.coverage_kernel()
        return F.conv2d(coverage[:, None], weight, bias, padding=weight.shape[-1] // 2)

    def unfused_coverage_features(self, coverage: torch.Tensor) -> torch.Tensor:
        """The official computation (each conv to 512 channels, then its projection), [N,A,h,w]."""
        total = None
        for conv, proj in zip(self.coverage_convs, self.coverage_projs):
            part = proj(conv(coverage[:, None]).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            total = part if total is None else total + part
        assert total is not None
        return total

    def forward(self, query: torch.Tensor, memory: torch.Tensor, keys: torch.Tensor, memory_mask: torch.Tensor,
                coverage: torch.Tensor,
                kernel: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One step. query [N,n] (the first GRU's state), memory [N,D,h,w], keys [N,A,h,w] (:meth:`keys`),
        memory_mask [N,h,w] bool (True = pad), coverage [N,h,w] -> (context [N,D], attention [N,h,w])."""
        hidden = torch.tanh(keys + self.query_proj(query)[:, :, None, None] + self.coverage_features(coverage, kernel))
        energy = torch.einsum("nahw,a->nhw", hidden, self.energy.weight[0]) + self.energy.bias
        energy = energy.masked_fill(memory_mask, float("-inf"))
        attention = torch.softmax(energy.flatten(1), dim=1).view_as(energy)
        context = torch.einsum("ndhw,nhw->nd", memory, attention)
        return context, attention
