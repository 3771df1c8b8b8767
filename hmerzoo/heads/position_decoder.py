"""PosFormer's position recognition task (Guan et al., ECCV 2024, SJTU-DeepVisionLab/PosFormer): a second
decoder reads the image memory with the position-forest code of every input token (:mod:`.position_forest`)
instead of its word embedding, and predicts each output token's nesting level and its relation to its parent.

What the official ``Pos_Former/model/decoder.py`` (``PosDecoder``), ``model/posformer.py`` and
``lit_posformer.py`` do, and this head does:

- the position decoder is CoMER's decoder (same layers, the same ARM, the same implicit attention correction as the
  main decoder: ``coverage_skip``) whose input is ``Linear(5, d) -> GELU -> LayerNorm`` of the input code, then
  the word position encoding and a LayerNorm; ``<pad>`` inputs are masked as keys as in the main decoder;
- two MLPs over its final states, ``d -> 128 -> ReLU -> 5`` (levels) and ``d -> 128 -> ReLU -> 6`` (relations);
- loss: the token-mean cross-entropy of each over the positions whose main target is not ``<pad>``; the official
  total is ``(CE + 0.25 CE_level + 0.25 CE_relation) / 1.5`` (``weight`` 0.25 each, with the main loss's
  ``weight`` 1/1.5 and ``scale`` 1/1.5 here);
- decoding: unused (the official search runs the main decoder alone), so the head never touches the search.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..batch import Batch
from ..decoders.comer import CoMERDecoder
from ..errors import RecipeError
from ..registry import HEADS
from ..sequence import IGNORE_INDEX, DecoderOutput, to_device
from ..vocab import Vocabulary
from .position_forest import CODE_LENGTH, NUM_LEVELS, NUM_RELATIONS, forest_paths, input_codes, level_position_targets


class PositionDecoder(CoMERDecoder):
    """CoMER's decoder over position-forest codes; outputs (level logits, relation logits) instead of words."""

    def __init__(self, vocab: Vocabulary, pad_id: int, sos_id: int, eos_id: int, d_model: int, nhead: int,
                 num_layers: int, dim_feedforward: int, dropout: float, dc: int, cross_coverage: bool,
                 self_coverage: bool, max_positions: int, coverage_skip: Sequence[str], hidden: int = 128):
        super().__init__(d_model, len(vocab), pad_id, sos_id, eos_id, d_model, nhead, num_layers, dim_feedforward,
                         dropout, dc, cross_coverage, self_coverage, max_positions=max_positions,
                         coverage_skip=coverage_skip, vocab=vocab)
        del self.word_embed, self.embed_norm  # the codes replace the words (proj: an Identity, see _add_output)
        self.code_embed = nn.Sequential(nn.Linear(CODE_LENGTH, d_model), nn.GELU(), nn.LayerNorm(d_model))
        self._given_codes: torch.Tensor | None = None  # set by outputs() for one pass
        self.level_proj = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, NUM_LEVELS))
        self.relation_proj = nn.Sequential(nn.Linear(d_model, hidden), nn.ReLU(), nn.Linear(hidden, NUM_RELATIONS))
        self.symbols = list(vocab.tokens)
        self.specials = {"pad": vocab.tokens[pad_id], "sos": vocab.tokens[sos_id], "eos": vocab.tokens[eos_id]}

    def _add_output(self) -> None:
        self.proj = nn.Identity()  # decode() returns (proj(x), x); the MLPs read x

    def row_paths(self, inputs: torch.Tensor) -> list[list[list[int]]]:
        """Position-forest paths of every input row [N,L] (an R2L row starts with ``<eos>``, as officially)."""
        paths = []
        for row in inputs.tolist():
            symbols = [self.symbols[t] for t in row]
            paths.append(forest_paths(symbols, reverse=row[0] == self.eos_id, **self.specials))
        return paths

    def _embed(self, inputs: torch.Tensor, offset: int = 0) -> torch.Tensor:
        codes = self._given_codes
        if codes is None:  # read the rows off the device (the training pass hands the codes in: no host wait)
            codes = torch.tensor([input_codes(p) for p in self.row_paths(inputs)], dtype=torch.float32,
                                 device=inputs.device)
        return self.input_norm(self.pos_enc(self.code_embed(codes.to(self.code_embed[0].weight.dtype)), offset))

    def outputs(self, memory: torch.Tensor, mask: torch.Tensor, inputs: torch.Tensor, rows_per_image: int,
                codes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(level logits [N,L,5], relation logits [N,L,6]) of input rows [N,L] over the memory; ``codes``
        [N,L,5]: the rows' input codes when the caller has them (else they are computed from ``inputs``)."""
        self._given_codes = codes
        try:
            _, hidden = self.decode(memory, mask, inputs, rows_per_image=rows_per_image)
        finally:
            self._given_codes = None
        return self.level_proj(hidden), self.relation_proj(hidden)


@HEADS.register("position_forest")
class PositionForestHead(nn.Module):
    """PosFormer's position decoder and its two losses (see the module docstring). ``level_weight`` and
    ``relation_weight``: the losses' weights (official 0.25 each, before the official total's / 1.5, see
    ``scale``). ``scale``: multiplies both (official 1/1.5). The decoder options default to the main decoder's
    (official: the same arguments build both)."""

    def __init__(self, d_model: int, vocab: Vocabulary, decoder: Any = None, level_weight: float = 0.25,
                 relation_weight: float = 0.25, scale: float = 1.0, nhead: int | None = None,
                 num_layers: int | None = None, dim_feedforward: int | None = None, dropout: float | None = None,
                 dc: int | None = None, cross_coverage: bool | None = None, self_coverage: bool | None = None,
                 coverage_skip: Sequence[str] | None = None, max_positions: int | None = None, hidden: int = 128):
        super().__init__()
        if d_model is None:
            raise RecipeError("position_forest head: the decoder does not say its width (d_model)")
        if vocab.pad_id is None:
            raise RecipeError("position_forest head: needs a <pad> token (the official vocabulary's id 0)")

        def option(value: Any, name: str, default: Any) -> Any:
            return value if value is not None else getattr(decoder, name, default)

        arm = getattr(decoder, "arm", None)
        self.level_weight, self.relation_weight, self.scale = level_weight, relation_weight, scale
        self.pad_id = vocab.pad_id
        self.decoder = PositionDecoder(
            vocab, vocab.pad_id, vocab.sos_id, vocab.eos_id, d_model,
            nhead=option(nhead, "nhead", 8),
            num_layers=num_layers if num_layers is not None else len(getattr(decoder, "layers", [None] * 3)),
            dim_feedforward=dim_feedforward if dim_feedforward is not None else
            (decoder.layers[0].linear1.out_features if hasattr(decoder, "layers") else 1024),
            dropout=dropout if dropout is not None else 0.3,
            dc=dc if dc is not None else (arm.conv.out_channels if arm is not None else 32),
            cross_coverage=option(cross_coverage, "cross_coverage", True),
            self_coverage=option(self_coverage, "self_coverage", True),
            max_positions=max_positions if max_positions is not None else
            (decoder.pos_enc.pe.shape[0] if hasattr(decoder, "pos_enc") else 500),
            coverage_skip=option(coverage_skip, "coverage_skip", ()), hidden=hidden)

    def targets(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(level, relation) targets [N,L] of input rows [N,L] (official ``out2layernum_and_pos``)."""
        pairs = [level_position_targets(p) for p in self.decoder.row_paths(inputs)]
        levels = torch.tensor([lv for lv, _ in pairs], dtype=torch.long, device=inputs.device)
        relations = torch.tensor([r for _, r in pairs], dtype=torch.long, device=inputs.device)
        return levels, relations

    def losses(self, output: DecoderOutput,
               tokens: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(level loss, relation loss, level logits, relation logits) of a training pass's rows.

        The input rows, their codes and the targets are built on the host from the captions and moved with one
        asynchronous copy each; the official mask (main target not ``<pad>``) is an ignore index, not a boolean
        index: the training step never waits for the device here."""
        if "memory" not in output.extras:  # HMERModel.forward hands every head the image memory
            raise ValueError("position_forest head: the training pass carries no image memory "
                             "(DecoderOutput.extras['memory'] and ['memory_mask'])")
        memory, mask = output.extras["memory"], output.extras["memory_mask"]
        rows = self.input_rows(output, tokens)
        d = self.decoder
        paths = [forest_paths([d.symbols[t] for t in row], reverse=row[0] == d.eos_id, **d.specials) for row in rows]
        inputs = to_device(torch.tensor(rows, dtype=torch.long), memory.device)
        codes = to_device(torch.tensor([input_codes(p) for p in paths], dtype=torch.float32), memory.device)
        pairs = [level_position_targets(p) for p in paths]
        levels = to_device(torch.tensor([lv for lv, _ in pairs], dtype=torch.long), memory.device)
        relations = to_device(torch.tensor([r for _, r in pairs], dtype=torch.long), memory.device)
        rows_per_image = inputs.shape[0] // memory.shape[0]
        level_logits, relation_logits = d.outputs(memory, mask, inputs, rows_per_image, codes=codes)
        ignored = output.targets.reshape(-1) == IGNORE_INDEX  # the official mask: main target not <pad>
        level_loss = F.cross_entropy(level_logits.reshape(-1, NUM_LEVELS).float(),
                                     levels.reshape(-1).masked_fill(ignored, IGNORE_INDEX), ignore_index=IGNORE_INDEX)
        relation_loss = F.cross_entropy(relation_logits.reshape(-1, NUM_RELATIONS).float(),
                                        relations.reshape(-1).masked_fill(ignored, IGNORE_INDEX),
                                        ignore_index=IGNORE_INDEX)
        return level_loss, relation_loss, level_logits, relation_logits

    def input_rows(self, output: DecoderOutput, tokens: Sequence[Sequence[int]]) -> list[list[int]]:
        """The decoder input rows of a training pass as lists (its rows' directions, the samples in order in each):
        ``<sos> y1..yn`` (L2R) or ``<eos> yn..y1`` (R2L), right-padded with ``<pad>``."""
        directions = output.directions or ["l2r"] * output.targets.shape[0]
        d = self.decoder
        length = max((len(t) for t in tokens), default=0) + 1
        taken = {direction: 0 for direction in directions}
        rows = []
        for direction in directions:
            seq = list(tokens[taken[direction] % len(tokens)])
            taken[direction] += 1
            row = [d.sos_id] + seq if direction == "l2r" else [d.eos_id] + seq[::-1]
            rows.append(row + [d.pad_id] * (length - len(row)))
        return rows

    def inputs_of(self, output: DecoderOutput, tokens: Sequence[Sequence[int]],
                  device: torch.device) -> torch.Tensor:
        """The decoder input rows of a training pass, as a tensor on ``device``."""
        return to_device(torch.tensor(self.input_rows(output, tokens), dtype=torch.long), device)

    def forward(self, output: DecoderOutput, batch: Batch) -> dict[str, torch.Tensor]:
        level_loss, relation_loss, _, _ = self.losses(output, batch.tokens)
        return {"level": self.scale * self.level_weight * level_loss,
                "relation": self.scale * self.relation_weight * relation_loss}

    def extra_repr(self) -> str:
        return f"level_weight={self.level_weight}, relation_weight={self.relation_weight}, scale={self.scale}"
