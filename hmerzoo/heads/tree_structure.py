"""TAMER's tree-structure task (Zhu et al., AAAI 2025, qingzhenduyu/TAMER): at every decoder position, point at the
position of the token's parent in the LaTeX tree (:mod:`.latex_tree`).

What the official ``tamer/model/decoder.py`` (``StructSim``), ``tamer/utils/utils.py`` (``to_struct_output``),
``tamer/lit_tamer.py`` and ``tamer/utils/generation_utils.py`` do, and this head does:

- per direction (its own weights for L2R and for R2L rows): one post-LN transformer encoder layer (8 heads,
  feed-forward 1024, dropout 0.3, ReLU; not causal, ``<pad>`` inputs masked as keys) over the final decoder states,
  then ``q = W_q x``, ``k = W_k x`` and the similarity ``sim[t, l] = w . ReLU(q_t + k_l) + b`` (keys at ``<pad>``
  inputs: -inf);
- target at position t: the position of its token's parent in that row's order (-1 for syntax tokens and the first
  token, ignored); at the stop position: n - 1;
- loss = ``weight`` x the token-mean cross-entropy of ``sim`` rows against those positions (official weight 1);
- decoding (``decode.mode: tamer``): after CoMER's search and rating, each hypothesis gains its structure score,
  the mean over both directions of the mean log-probability of its parent positions, and a hypothesis whose LaTeX
  the tree rules cannot read (illegal) is dropped. The head attaches itself to the decoder as its ``rescorer``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..batch import Batch
from ..decoders.base import length_chunks
from ..errors import RecipeError
from ..registry import HEADS
from ..sequence import IGNORE_INDEX, DecoderOutput, teacher_forcing_tensors, to_device
from ..vocab import Vocabulary
from .implicit_characters import EncoderLayer
from .latex_tree import structure_targets

DIRECTIONS = ("l2r", "r2l")


class StructureSimilarity(nn.Module):
    """One direction's encoder layer and additive similarity between positions."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, dropout: float):
        super().__init__()
        self.layer = EncoderLayer(d_model, nhead, dim_feedforward, dropout)
        self.to_q = nn.Linear(d_model, d_model)
        self.to_k = nn.Linear(d_model, d_model)
        self.to_sim = nn.Linear(d_model, 1)

    def forward(self, hidden: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """hidden [N,L,d], pad [N,L] (True: <pad> input) -> sim [N,L,L] (query position, key position)."""
        x, _, _ = self.layer(hidden, ~pad[:, None, None, :])
        q, k = self.to_q(x), self.to_k(x)
        sim = self.to_sim(F.relu(q[:, :, None, :] + k[:, None, :, :])).squeeze(-1)
        return sim.masked_fill(pad[:, None, :], float("-inf"))


@HEADS.register("tree_structure")
class TreeStructureHead(nn.Module):
    """TAMER's structure head (see the module docstring). ``weight``: its loss weight (official 1). ``rescore``:
    attach to the decoder as the rescorer of ``decode.mode: tamer`` (official: the search uses it).
    ``nhead``, ``dim_feedforward``, ``dropout``: each direction's encoder layer (official 8, 1024, 0.3)."""

    def __init__(self, d_model: int, vocab: Vocabulary, decoder: Any = None, weight: float = 1.0,
                 rescore: bool = True, nhead: int = 8, dim_feedforward: int = 1024, dropout: float = 0.3):
        super().__init__()
        if d_model is None:
            raise RecipeError("tree_structure head: the decoder does not say its width (d_model)")
        self.weight = weight
        self.tokens = list(vocab.tokens)
        self.sos_id, self.eos_id = vocab.sos_id, vocab.eos_id
        self.pad_id = vocab.pad_id if vocab.pad_id is not None else 0
        self.l2r = StructureSimilarity(d_model, nhead, dim_feedforward, dropout)
        self.r2l = StructureSimilarity(d_model, nhead, dim_feedforward, dropout)
        if rescore:
            if decoder is None or not hasattr(decoder, "attach_rescorer"):
                raise RecipeError("tree_structure head: rescore: true scores hypotheses with the decoder's hidden "
                                  f"states, which needs a transformer decoder (bttr, comer); {type(decoder).__name__} "
                                  "has none. Set rescore: false for the auxiliary loss alone")
            decoder.attach_rescorer(self)

    # --- targets ----------------------------------------------------------------------------------------------
    def targets(self, tokens: Sequence[Sequence[int]], directions: Sequence[str],
                length: int) -> tuple[torch.Tensor, list[bool]]:
        """Parent-position targets [N, length] of decoder rows in ``directions`` (each direction's rows: the
        samples in order), IGNORE_INDEX where there is none; and whether each sample is illegal."""
        per_sample = [structure_targets([self.tokens[t] for t in seq]) for seq in tokens]
        out = torch.full((len(directions), length), IGNORE_INDEX, dtype=torch.long)
        for direction in dict.fromkeys(directions):
            rows = [i for i, d in enumerate(directions) if d == direction]
            if len(rows) != len(per_sample):
                raise ValueError(f"tree_structure head: {len(rows)} {direction} rows for a batch of "
                                 f"{len(per_sample)} samples; expected one per sample")
            for row, (l2r, r2l, _) in zip(rows, per_sample):
                target = l2r if direction == "l2r" else r2l
                out[row, :len(target)] = torch.tensor([IGNORE_INDEX if p < 0 else p for p in target])
        return out, [illegal for _, _, illegal in per_sample]

    # --- computation --------------------------------------------------------------------------------------------
    def similarity(self, hidden: torch.Tensor, pad: torch.Tensor, directions: Sequence[str]) -> torch.Tensor:
        """sim [N,L,L] of decoder states [N,L,d], each row by its direction's module."""
        sim = hidden.new_empty(hidden.shape[0], hidden.shape[1], hidden.shape[1])
        for direction in dict.fromkeys(directions):
            index = to_device(torch.tensor([i for i, d in enumerate(directions) if d == direction]), hidden.device)
            module = self.l2r if direction == "l2r" else self.r2l
            sim = sim.index_copy(0, index, module(hidden.index_select(0, index), pad.index_select(0, index)))
        return sim

    def forward(self, output: DecoderOutput, batch: Batch) -> torch.Tensor:
        if output.hidden is None:
            raise ValueError("tree_structure head: the decoder returned no hidden states")
        n, length, _ = output.hidden.shape
        directions = output.directions or (["l2r"] * n)
        sim = self.similarity(output.hidden, output.targets == IGNORE_INDEX, directions)
        targets, _ = self.targets(batch.tokens, directions, length)
        targets = to_device(targets, sim.device)
        loss = F.cross_entropy(sim.reshape(-1, length).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return self.weight * loss

    @torch.no_grad()
    def score_hypotheses(self, decoder: Any, memory: torch.Tensor, memory_mask: torch.Tensor,
                         tokens: list[list[int]], memory_index: Sequence[int]) -> tuple[torch.Tensor, list[bool]]:
        """The official search's structure score of each hypothesis (reading order; it reads memory row
        ``memory_index[i]``, a host list): the mean over both directions of ``sum log p(parent) / #targets``, and whether the
        hypothesis is illegal. Hypotheses of similar length are scored together. ([N] float32 on the host, [N])"""
        scores = torch.zeros(len(tokens), dtype=torch.float32)
        illegal: list[bool] = [False] * len(tokens)
        for chunk in length_chunks([len(t) for t in tokens]):
            seqs = [tokens[i] for i in chunk]
            chunk_rows = [memory_index[i] for i in chunk]
            total = torch.zeros(len(chunk), dtype=torch.float32, device=memory.device)
            for direction in DIRECTIONS:
                inputs, _ = teacher_forcing_tensors(seqs, direction, self.sos_id, self.eos_id, self.pad_id,
                                                    memory.device)
                _, hidden = decoder.decode(memory, memory_mask, inputs, memory_index=chunk_rows)
                sim = self.similarity(hidden, inputs == self.pad_id, [direction] * len(chunk)).float()
                targets, bad = self.targets(seqs, [direction] * len(chunk), inputs.shape[1])
                targets = to_device(targets, sim.device)
                ce = F.cross_entropy(sim.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="none").view(len(chunk), -1)
                total = total + (-ce.sum(1) / (targets != IGNORE_INDEX).sum(1))
            scores[torch.tensor(chunk)] = (total / 2).cpu()
            for i, b in zip(chunk, bad):
                illegal[i] = b
        return scores, illegal

    def extra_repr(self) -> str:
        return f"weight={self.weight}"
