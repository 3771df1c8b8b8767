"""The composite model the trainer drives, and the contract its parts keep (the token contract: sequence.py;
the decoder contract: decoders/base.py).

    encoder : images [B,1,H,W], mask [B,H,W] (True = pad) -> features [B,C,h,w], mask [B,h,w]
    neck    : (optional) features [B,C,h,w], mask -> memory [B,h,w,d] (channels last), mask [B,h,w]
    decoder : teacher forcing  decoder(memory, mask, tokens) -> DecoderOutput
              incremental      decoder.init_state(memory, mask, direction) -> state
                               decoder.step(state, last_tokens [N]) -> (logits [N,V], state)
                               decoder.reorder_state(state, index [N']) -> state
    loss    : loss(output, batch) -> tensor or {name: tensor}      (the main objective)
    heads   : head(output, batch) -> tensor or {name: tensor}      (auxiliary tasks; each builds its own targets)
              output.extras["memory"/"memory_mask"]: the image memory, for heads that read it (counting)

``HMERModel.forward(batch)`` returns ``{"loss": scalar, "losses": {name: scalar}}``; the trainer only ever
uses that, so it never needs to know which model it trains.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from .batch import Batch, pad_images
from .decoding.recognize import decode_config, image_tensors, recognize_tensors
from .sequence import direction_tokens
from .vocab import Vocabulary


@dataclass
class Recognition:
    """One image's recognition.

    latex: space-separated tokens; tokens: their ids (reading order, no start/stop tokens); score: the decoding
    mode's ranking score of the chosen hypothesis (``score / len**alpha``, the official final choice);
    hypotheses: every hypothesis the mode ranked (``hmerzoo.decoding.Hypothesis``; BTTR: the L2R beam's, then the
    R2L beam's, each with its search score and its rescored score).
    """

    latex: str
    tokens: list[int]
    score: float
    hypotheses: list[Any] = field(default_factory=list)


class HMERModel(nn.Module):
    """Vocabulary + encoder (+ neck) + decoder + main loss + auxiliary heads."""

    def __init__(self, vocab: Vocabulary, encoder: nn.Module, decoder: nn.Module, loss: nn.Module,
                 neck: nn.Module | None = None, heads: dict[str, nn.Module] | None = None,
                 recipe: dict | None = None):
        super().__init__()
        self.vocab = vocab
        self.encoder = encoder
        self.neck = neck
        self.decoder = decoder
        self.loss = loss
        self.heads = nn.ModuleDict(heads or {})
        self.recipe = recipe  # the resolved recipe the model was built from (saved with checkpoints)

    # --- training -------------------------------------------------------------------------------------------
    def encode(self, images: torch.Tensor, image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats, mask = self.encoder(images, image_mask)
        if self.neck is not None:
            feats, mask = self.neck(feats, mask)
        return feats, mask

    def forward(self, batch: Batch) -> dict[str, Any]:
        memory, mask = self.encode(batch.images, batch.image_mask)
        out = self.decoder(memory, mask, batch.tokens)
        # heads that read the image memory themselves (e.g. counting on any encoder) find it here
        out.extras.setdefault("memory", memory)
        out.extras.setdefault("memory_mask", mask)
        losses: dict[str, torch.Tensor] = {}
        _collect(losses, "ce", self.loss(out, batch))
        for name, head in self.heads.items():
            _collect(losses, name, head(out, batch))
        total = sum(losses.values())
        return {"loss": total, "losses": losses, "output": out}

    # --- inference ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def greedy(self, images: torch.Tensor, image_mask: torch.Tensor, max_len: int = 200,
               direction: str = "l2r") -> list[list[int]]:
        """Greedy decoding through the decoder's incremental interface; returns token ids in reading order."""
        memory, mask = self.encode(images, image_mask)
        start, stop = direction_tokens(self.vocab.sos_id, self.vocab.eos_id, direction)
        n = images.shape[0]
        state = self.decoder.init_state(memory, mask, direction)
        last = torch.full((n,), start, dtype=torch.long, device=images.device)
        done = torch.zeros(n, dtype=torch.bool, device=images.device)
        steps: list[torch.Tensor] = []
        # tokens stay on the device: one host read per step (all rows done?), and one at the end for the tokens
        for _ in range(max_len):
            logits, state = self.decoder.step(state, last)
            last = logits.argmax(-1)
            steps.append(last)
            done = done | (last == stop)
            if bool(done.all()):
                break
        if not steps:
            return [[] for _ in range(n)]
        tokens = torch.stack(steps, dim=1)  # [n, steps]
        is_stop = tokens == stop
        # a row ends before its first stop token (argmax: the first maximum); rows that never stop keep every step
        length = torch.where(is_stop.any(1), is_stop.int().argmax(1), tokens.shape[1])
        rows = torch.cat([tokens, length[:, None]], dim=1).tolist()
        seqs = [row[:row[-1]] for row in rows]
        return seqs if direction == "l2r" else [s[::-1] for s in seqs]

    @torch.no_grad()
    def score(self, images: Sequence[Any] | Any, latex: Sequence[str] | str, direction: str = "l2r") -> torch.Tensor:
        """Log-probability of each (image, LaTeX) pair under one direction, end token included.

        ``images``: PIL images, numpy arrays or paths (white ink on black), each scored alone and unpadded.
        ``latex``: space-separated tokens. Returns a float tensor [N] (summed log-probabilities).
        """
        from .data.images import load_image_tensor  # local import: data is optional for pure model use

        if isinstance(latex, str):
            latex, images = [latex], [images]
        if len(images) != len(latex):
            raise ValueError(f"score: {len(images)} images but {len(latex)} captions")
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        scores = []
        try:
            for img, tex in zip(images, latex):
                t = load_image_tensor(img)
                x, m = pad_images([t])
                memory, mask = self.encode(x.to(device), m.to(device))
                ids = self.vocab.encode(tex, where="score")
                scores.append(self.decoder.log_likelihood(memory, mask, [ids], direction)[0])
        finally:
            self.train(was_training)
        return torch.stack(scores).float().cpu()

    @torch.no_grad()
    def recognize(self, images: Sequence[Any] | Any, beam_size: int | None = None, max_len: int | None = None,
                  alpha: float | None = None, mode: str | None = None, batching: str | None = None,
                  batch_size: int | None = None) -> list[Recognition]:
        """Beam-search LaTeX for each image, in order.

        ``images``: one or a list of PIL images, numpy arrays, paths or [1,h,w] tensors (white ink on black;
        user photos are normalised when the data package offers ``prepare_image``). Every other argument defaults
        to the recipe's ``decode:`` section, then to :class:`hmerzoo.config.DecodeConfig`: ``mode`` one of
        ``hmerzoo.registry.SEARCH_MODES`` (l2r, r2l, bttr, comer, abm); ``batching`` per_image (each image's result independent
        of the others) | padded (batches of ``batch_size`` padded together, as the official CoMER evaluation).
        See :mod:`hmerzoo.decoding`.
        """
        config = decode_config(self.recipe, beam_size=beam_size, max_len=max_len, alpha=alpha, mode=mode,
                               batching=batching, batch_size=batch_size)
        if not isinstance(images, (list, tuple)):
            images = [images]
        tensors = image_tensors(images, self.recipe)
        was_training = self.training
        self.eval()
        try:
            results = recognize_tensors(self, tensors, config)
        finally:
            self.train(was_training)
        return [Recognition(latex=self.vocab.to_latex(r.best.tokens), tokens=list(r.best.tokens),
                            score=r.best_score, hypotheses=r.hypotheses) for r in results]

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def _collect(losses: dict[str, torch.Tensor], name: str, value: Any) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            losses[k if k not in losses else f"{name}.{k}"] = v
    else:
        losses[name] = value
