"""The token/sequence contract every layer of hmerzoo shares: target ids, teacher forcing, the decoder output.

It imports nothing of hmerzoo, so decoders, heads, losses, decoding and the model can all build on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # target id of positions without a target (padding); what F.cross_entropy ignores


@dataclass
class DecoderOutput:
    """What a decoder's teacher-forced forward returns.

    logits: [N, L, V]; targets: [N, L] with IGNORE_INDEX where there is no target.
    hidden: [N, L, d] final decoder states (for auxiliary heads), or None.
    directions: per row of N, "l2r" or "r2l" (bidirectional decoders stack both directions: N = 2B).
    extras: anything else a decoder's own loss or heads need (attention maps, second branch...).
    """

    logits: torch.Tensor
    targets: torch.Tensor
    hidden: torch.Tensor | None = None
    directions: list[str] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)


def direction_tokens(vocab_sos: int, vocab_eos: int, direction: str) -> tuple[int, int]:
    """(start, stop) token ids of a direction: L2R runs <sos> ... <eos>, R2L runs <eos> ... <sos>."""
    if direction == "l2r":
        return vocab_sos, vocab_eos
    if direction == "r2l":
        return vocab_eos, vocab_sos
    raise ValueError(f"direction must be 'l2r' or 'r2l', got {direction!r}")


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Move a tensor just built on the host to ``device`` without making the host wait: pinned first when the
    device is a GPU, so the copy is truly asynchronous (the caching host allocator keeps the pinned block alive
    until the copy is done). On the CPU this is a no-op."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available() and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def teacher_forcing_tensors(tokens: Sequence[Sequence[int]], direction: str, sos_id: int, eos_id: int,
                            pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder inputs and targets for one direction, as BTTR builds them.

    L2R: input ``<sos> y1..yn``, target ``y1..yn <eos>``; R2L: input ``<eos> yn..y1``, target ``yn..y1 <sos>``.
    Inputs are right-padded with ``pad_id``, targets with IGNORE_INDEX. Shapes [N, max_len + 1].
    Built as Python lists and turned into one host tensor, moved with one asynchronous copy (no host sync).
    """
    start, stop = direction_tokens(sos_id, eos_id, direction)
    n = len(tokens)
    length = max((len(t) for t in tokens), default=0) + 1
    if n == 0:
        empty = torch.empty((0, length), dtype=torch.long)
        return to_device(empty, device), to_device(empty.clone(), device)
    inputs, targets = [], []
    for seq in tokens:
        seq = list(seq) if direction == "l2r" else list(seq)[::-1]
        rest = length - 1 - len(seq)
        inputs.append([start, *seq] + [pad_id] * rest)
        targets.append([*seq, stop] + [IGNORE_INDEX] * rest)
    both = to_device(torch.tensor([inputs, targets], dtype=torch.long), device)
    return both[0], both[1]


def sequence_log_likelihood(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over positions of log_softmax(logits)[target], skipping IGNORE_INDEX. [N, L, V], [N, L] -> [N]."""
    logp = F.log_softmax(logits.float(), dim=-1)
    valid = targets != IGNORE_INDEX
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * valid).sum(-1)
