"""The decoder contract (see hmerzoo/model.py for the whole model contract).

A decoder is a :class:`SequenceDecoder` (an ``nn.Module``) with:

- ``d_model``: width of its hidden states (heads are sized from it); ``vocab_size``, ``sos_id``, ``eos_id``,
  ``pad_id`` (None when the vocabulary has no ``<pad>``);
- ``forward(memory, memory_mask, tokens) -> DecoderOutput``: the training objective's teacher-forced pass.
  ``tokens`` is a list of per-sample token-id lists without start/end tokens; the decoder builds its own
  inputs and targets (e.g. BTTR stacks L2R and R2L rows);
- ``teacher_forced(memory, memory_mask, tokens, direction) -> (logits [N,L,V], targets [N,L])`` for one
  direction (used by scoring and rescoring);
- ``init_state(memory, memory_mask, direction)``, ``step(state, last_tokens) -> (logits [N,V], state)`` and
  ``reorder_state(state, index)``: incremental decoding, so that one search serves every decoder;
- ``log_likelihood(memory, memory_mask, tokens, direction, memory_index)`` and ``prefix_logits(memory,
  memory_mask, inputs, direction)`` (logits [N,t,V] of a full teacher-forced pass over decoder inputs [N,t], start
  token first; the "re-run the prefix" benchmark mode), both with defaults here built on ``teacher_forced``.

Capabilities are declared, not probed: class attributes of :class:`SequenceDecoder` (a subclass overrides them,
as a class attribute or, when they depend on its options, a property), gathered by ``decoder.capabilities`` into
a :class:`DecoderCapabilities`. The search reads them there:

- ``directions``: the directions it decodes (both for every system here);
- ``supports_mixed_directions``: ``init_state`` also accepts a list of directions, one per memory row, so the
  L2R and R2L beams of a bidirectional search run in one batch (True when both directions share the weights
  and the direction only picks the start token). False: the search runs one batch per direction;
- ``memory_padding_invariant``: decoding a memory padded beyond the image (mask True there) gives the results
  of the unpadded memory, so separately encoded images can share one search. False: each image alone;
- ``shares_image_memory``: ``reorder_state`` moves only per-row tensors and a row -> image index; each image's
  memory (cross-attention keys/values) stays once per image however many hypotheses read it, so many beams per
  image cost no memory copies.

``takes_memory_rows`` (an attribute, not a capability: only the search's bookkeeping reads it): ``reorder_state``
also accepts ``memory_rows=``, the memory row of every new row as a host list, which the search knows, so a
decoder that regroups rows by image needs no read of the device to do it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..sequence import DecoderOutput, sequence_log_likelihood, teacher_forcing_tensors


@dataclass(frozen=True)
class DecoderCapabilities:
    """What a decoder declares about itself (see the module docstring)."""

    directions: tuple[str, ...]
    supports_mixed_directions: bool
    memory_padding_invariant: bool
    shares_image_memory: bool


class SequenceDecoder(nn.Module):
    d_model: int
    vocab_size: int
    sos_id: int
    eos_id: int
    pad_id: int | None = None
    directions: tuple[str, ...] = ("l2r", "r2l")
    supports_mixed_directions: bool = False
    memory_padding_invariant: bool = False
    shares_image_memory: bool = False
    takes_memory_rows: bool = False

    @property
    def capabilities(self) -> DecoderCapabilities:
        return DecoderCapabilities(directions=tuple(self.directions),
                                   supports_mixed_directions=bool(self.supports_mixed_directions),
                                   memory_padding_invariant=bool(self.memory_padding_invariant),
                                   shares_image_memory=bool(self.shares_image_memory))

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
                       direction: str = "l2r", memory_index: torch.Tensor | None = None) -> torch.Tensor:
        """Summed log-probability of each token sequence plus its stop token, under ``direction``. [N] float32.

        ``memory_index`` [N]: sequence i reads memory row ``memory_index[i]`` (rescoring many hypotheses of few
        images); None: one memory row per sequence. Sequences of similar length are scored in one teacher-forced
        pass each (:func:`length_chunks`): padding hypotheses of 5 and 70 tokens to one length wastes much of it.
        """
        if memory_index is None:
            memory_index = torch.arange(len(tokens), device=memory.device)
        scores = torch.empty(len(tokens), dtype=torch.float32, device=memory.device)
        for chunk in length_chunks([len(seq) for seq in tokens]):
            rows = torch.tensor(chunk, dtype=torch.long, device=memory.device)
            images = memory_index.index_select(0, rows)
            logits, targets = self.teacher_forced(memory.index_select(0, images), memory_mask.index_select(0, images),
                                                  [tokens[i] for i in chunk], direction)
            scores[rows] = sequence_log_likelihood(logits, targets)
        return scores

    def prefix_logits(self, memory: torch.Tensor, memory_mask: torch.Tensor, inputs: torch.Tensor,
                      direction: str | Sequence[str] = "l2r") -> torch.Tensor:
        """Logits [N,t,V] of a teacher-forced pass over decoder inputs [N,t] that start with the start token.

        ``direction``: one for all rows, or one per row (decoders with ``supports_mixed_directions``). The default
        goes through ``teacher_forced``, which takes sequences in reading order and adds the start token itself,
        so each decoded prefix (R2L: reversed) is handed back in reading order, one pass per direction.
        """
        directions = [direction] * inputs.shape[0] if isinstance(direction, str) else list(direction)
        body = [seq[::-1] if d == "r2l" else seq for seq, d in zip(inputs[:, 1:].tolist(), directions)]
        logits: torch.Tensor | None = None
        for d in sorted(set(directions)):
            rows = [i for i, row_direction in enumerate(directions) if row_direction == d]
            index = torch.tensor(rows, dtype=torch.long, device=memory.device)
            part, _ = self.teacher_forced(memory.index_select(0, index), memory_mask.index_select(0, index),
                                          [body[i] for i in rows], d)
            if logits is None:
                logits = part.new_empty(inputs.shape[0], *part.shape[1:])
            logits[index] = part
        assert logits is not None
        return logits


def length_chunks(lengths: Sequence[int], slack: float = 1.25) -> list[list[int]]:
    """Indices grouped by length, longest first, so that padding a group to its longest sequence costs at most
    ``slack`` times its real positions (length + 1 for the start token); a group of one always fits."""
    chunks: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size = lengths[i] + 1
        if current and (len(current) + 1) * (lengths[current[0]] + 1) > slack * (real + size):
            chunks.append(current)
            current, real = [], 0
        current.append(i)
        real += size
    if current:
        chunks.append(current)
    return chunks


def stacked_bidirectional_forward(decoder: torch.nn.Module, memory: torch.Tensor, memory_mask: torch.Tensor,
                                  tokens: Sequence[Sequence[int]]) -> DecoderOutput:
    """The BTTR family's training pass (BTTR's ``to_bi_tgt_out``): the L2R rows of every sample, then the R2L rows,
    in one 2B batch sharing the image memory. ``decoder`` provides ``sos_id``, ``eos_id``, ``pad_id`` and
    ``decode(memory, mask, inputs, rows_per_image=2) -> (logits, hidden)``."""
    device = memory.device
    ids = (decoder.sos_id, decoder.eos_id, decoder.pad_id, device)
    l2r_in, l2r_out = teacher_forcing_tensors(tokens, "l2r", *ids)
    r2l_in, r2l_out = teacher_forcing_tensors(tokens, "r2l", *ids)
    logits, hidden = decoder.decode(memory, memory_mask, torch.cat((l2r_in, r2l_in)), rows_per_image=2)
    n = len(tokens)
    return DecoderOutput(logits=logits, targets=torch.cat((l2r_out, r2l_out)), hidden=hidden,
                         directions=["l2r"] * n + ["r2l"] * n)

