"""The decoder contract (see hmerzoo/model.py for the whole model contract).

A decoder is an ``nn.Module`` with:

- ``d_model``: width of its hidden states (heads are sized from it);
- ``forward(memory, memory_mask, tokens) -> DecoderOutput``: the training objective's teacher-forced pass.
  ``tokens`` is a list of per-sample token-id lists without start/end tokens; the decoder builds its own
  inputs and targets (e.g. BTTR stacks L2R and R2L rows);
- ``teacher_forced(memory, memory_mask, tokens, direction) -> (logits [N,L,V], targets [N,L])`` for one
  direction (used by scoring and rescoring);
- ``init_state(memory, memory_mask, direction)``, ``step(state, last_tokens) -> (logits [N,V], state)`` and
  ``reorder_state(state, index)``: incremental decoding, so that one search serves every decoder.

:class:`SequenceDecoder` provides ``log_likelihood`` on top of ``teacher_forced``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn

from ..model import DecoderOutput, sequence_log_likelihood


class SequenceDecoder(nn.Module):
    d_model: int

    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                tokens: Sequence[Sequence[int]]) -> DecoderOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def teacher_forced(self, memory: torch.Tensor, memory_mask: torch.Tensor, tokens: Sequence[Sequence[int]],
                       direction: str = "l2r") -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def init_state(self, memory: torch.Tensor, memory_mask: torch.Tensor, direction: str = "l2r") -> Any:  # pragma: no cover
        raise NotImplementedError

    def step(self, state: Any, last_tokens: torch.Tensor) -> tuple[torch.Tensor, Any]:  # pragma: no cover
        raise NotImplementedError

    def reorder_state(self, state: Any, index: torch.Tensor) -> Any:  # pragma: no cover
        raise NotImplementedError

    def log_likelihood(self, memory: torch.Tensor, memory_mask: torch.Tensor, tokens: Sequence[Sequence[int]],
                       direction: str = "l2r") -> torch.Tensor:
        """Summed log-probability of each token sequence plus its stop token, under ``direction``. [N]."""
        logits, targets = self.teacher_forced(memory, memory_mask, tokens, direction)
        return sequence_log_likelihood(logits, targets)
