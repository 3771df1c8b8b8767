"""Attention pictures: where the decoder looked for each token it wrote (``hmerzoo predict --attention DIR``).

The search keeps no attention (it would cost memory at every step of every hypothesis), so the chosen hypothesis
is decoded once more, teacher-forced, with attention recording switched on (``MultiheadAttention.recorded``; ABM's
teacher-forced pass returns its attention anyway):

- BTTR / CoMER / HMER-MTL / ICAL / TAMER / PosFormer: the cross-attention over the image memory, averaged over heads
  and layers (CoMER and PosFormer: the refined attention the values are read with, PosFormer's with its coverage
  skip), in the direction that found the chosen hypothesis;
- CAN: its coverage attention over the features (one GRU decoder, left to right, as ABM's branches);
- ABM: the attention of the L2R branch (the one ABM decodes with) and, in ``r2l/``, the R2L branch's attention
  on the same tokens (both branches' aggregated coverage attention).

Each map is a distribution over the feature map (it sums to 1), upsampled to the image, overlaid on it and captioned
with its token. R2L maps are put back in reading order. A neck with ``focus_map(features, mask) -> [B,h,w]`` (an
attention network in front of the decoder) adds ``attention_network.png``.
"""
from __future__ import annotations

import io
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .batch import pad_images
from .decoders.abm import ABMDecoder
from .decoders.can import CANDecoder
from .decoders.transformer import TransformerSequenceDecoder
from .decoding.recognize import decode_config, image_tensors, recognize_tensors
from .errors import HmerzooError
from .sequence import IGNORE_INDEX

TILE_WIDTH = 320  # width of one token's picture in the contact strip
STRIP_COLUMNS = 4
CAPTION_HEIGHT = 28
# the decoder families whose attention token_attention reads
ATTENTION_DECODERS = (TransformerSequenceDecoder, ABMDecoder, CANDecoder)


@dataclass
class TokenAttention:
    """The maps of one decoding: ``maps`` [T,h,w] (one per token, reading order), their ``tokens`` (strings)."""

    direction: str
    tokens: list[str]
    maps: torch.Tensor


@dataclass
class AttentionPictures:
    """What :func:`write_attention` produced: the recognised LaTeX, every map set, and the files written."""

    latex: str
    score: float
    attention: list[TokenAttention]
    focus: torch.Tensor | None = None
    files: list[Path] = field(default_factory=list)


@contextmanager
def recording(decoder: TransformerSequenceDecoder) -> Iterator[list[list[torch.Tensor]]]:
    """Turn on attention recording in every layer's cross-attention; yields one list per layer."""
    modules = [layer.multihead_attn for layer in decoder.layers]
    for module in modules:
        module.recorded = []
    try:
        yield [module.recorded for module in modules]  # type: ignore[misc]
    finally:
        for module in modules:
            module.recorded = None


@torch.no_grad()
def token_attention(model: Any, image: torch.Tensor, token_ids: list[int], direction: str) -> TokenAttention:
    """The decoder's attention while writing ``token_ids`` (reading order) in ``direction`` on ``image``
    ([1,h,w], white ink on black, as ``image_tensors`` makes it): one map [h',w'] over the feature map per token."""
    device = next(model.parameters()).device
    x, m = pad_images([image])
    memory, mask = model.encode(x.to(device), m.to(device))
    decoder = model.decoder
    steps = len(token_ids)
    if isinstance(decoder, TransformerSequenceDecoder):
        with recording(decoder) as layers:
            decoder.teacher_forced(memory, mask, [token_ids], direction)
        # each layer: one pass, [1,H,L,S] with L = tokens + the stop step
        stacked = torch.stack([recorded[-1][0] for recorded in layers])  # [layers,H,L,S]
        maps = stacked.float().mean(dim=(0, 1))[:steps].reshape(steps, *mask.shape[1:])
    elif isinstance(decoder, ABMDecoder):
        inputs, targets = decoder._teacher_forcing([token_ids], direction, device)
        _, _, attention = decoder.branch(direction).decode(memory, mask, inputs, targets != IGNORE_INDEX)
        maps = attention[0, :steps].float()
    elif isinstance(decoder, CANDecoder):
        inputs, _ = decoder._teacher_forcing([token_ids], device)
        maps = decoder.decode(memory, mask, inputs)[2]["attention"][0, :steps].float()
    else:
        raise HmerzooError(f"attention pictures: the {type(decoder).__name__} decoder records no attention "
                           "(supported: transformer decoders - bttr, comer, ical, tamer, posformer - abm and can)")
    if direction == "r2l":
        maps = maps.flip(0)  # step t wrote the t-th token from the end
    return TokenAttention(direction=direction, tokens=model.vocab.decode(token_ids, strip_specials=False),
                          maps=maps.cpu())


@torch.no_grad()
def focus_map(model: Any, image: torch.Tensor) -> torch.Tensor | None:
    """The neck's own attention map [h,w] when it has one (``focus_map(features, mask)``), else None."""
    neck = getattr(model, "neck", None)
    if neck is None or not callable(getattr(neck, "focus_map", None)):
        return None
    device = next(model.parameters()).device
    x, m = pad_images([image])
    features, mask = model.encoder(x.to(device), m.to(device))
    return neck.focus_map(features, mask)[0].float().cpu()


def write_attention(model: Any, image: Any, out_dir: str | Path, decode: dict | None = None) -> AttentionPictures:
    """Recognise ``image`` (path, PIL image, array or tensor) with the model's decode settings (``decode``
    overrides them) and write the attention pictures of the chosen hypothesis into ``out_dir``."""
    config = decode_config(getattr(model, "recipe", None), **(decode or {}))
    tensor = image_tensors([image], getattr(model, "recipe", None))[0]
    was_training = model.training
    model.eval()
    try:
        result = recognize_tensors(model, [tensor], config)[0]
        best = result.best
        sets = [token_attention(model, tensor, best.tokens, best.direction)]
        other = {"l2r": "r2l", "r2l": "l2r"}[best.direction]
        if isinstance(model.decoder, ABMDecoder) and other in model.decoder.directions:
            sets.append(token_attention(model, tensor, best.tokens, other))  # ABM: the other branch as well
        focus = focus_map(model, tensor)
    finally:
        model.train(was_training)
    out = Path(out_dir)
    pictures = AttentionPictures(latex=model.vocab.to_latex(best.tokens), score=result.best_score,
                                 attention=sets, focus=focus)
    background = tensor[0].cpu().numpy()
    for i, found in enumerate(sets):
        folder = out if i == 0 else out / found.direction
        pictures.files += write_token_pictures(background, found, folder)
    if focus is not None:
        path = out / "attention_network.png"
        captioned(overlay(background, focus), "attention network").save(path)
        pictures.files.append(path)
    return pictures


def attention_strip_png(model: Any, image: torch.Tensor, recognition: Any) -> bytes | None:
    """The contact strip of a recognition's token maps as PNG bytes (the demo page's picture), or None where the
    decoder records no attention or nothing was recognised. ``image``: [1,h,w] as ``image_tensors`` makes it."""
    if not recognition.tokens or not isinstance(model.decoder, ATTENTION_DECODERS):
        return None
    # the direction of the hypothesis that was chosen (two-direction modes rank both beams together)
    direction = next((h.direction for h in recognition.hypotheses if list(h.tokens) == list(recognition.tokens)),
                     model.decoder.capabilities.directions[0])
    found = token_attention(model, image, list(recognition.tokens), direction)
    background = image[0].cpu().numpy()
    tiles = [captioned(overlay(background, amap), f"{i + 1}: {token}")
             for i, (token, amap) in enumerate(zip(found.tokens, found.maps))]
    buffer = io.BytesIO()
    contact_strip(tiles, f"{found.direction.upper()}: " + " ".join(found.tokens)).save(buffer, format="PNG")
    return buffer.getvalue()


# --- pictures ----------------------------------------------------------------------------------------------------
def write_token_pictures(image: np.ndarray, found: TokenAttention, folder: Path) -> list[Path]:
    """One captioned overlay per token (``NNN_name.png``) and ``strip.png`` with all of them; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    files, tiles = [], []
    for i, (token, amap) in enumerate(zip(found.tokens, found.maps)):
        picture = captioned(overlay(image, amap), f"{i + 1}: {token}")
        path = folder / f"{i + 1:03d}_{_file_name(token)}.png"
        picture.save(path)
        files.append(path)
        tiles.append(picture)
    path = folder / "strip.png"
    contact_strip(tiles, f"{found.direction.upper()}: " + " ".join(found.tokens)).save(path)
    return files + [path]


def overlay(image: np.ndarray, amap: torch.Tensor, strength: float = 0.65) -> Image.Image:
    """The image ([h,w] in [0,1], white ink on black) shown black on white, with ``amap`` [h',w'] upsampled to it
    (bilinear) as a heat map; the map is scaled by its maximum so that every token's focus is visible."""
    height, width = image.shape
    heat = Image.fromarray(amap.numpy().astype(np.float32), mode="F").resize((width, height), Image.BILINEAR)
    value = np.asarray(heat, dtype=np.float32)
    value = np.clip(value / max(float(value.max()), 1e-12), 0.0, 1.0)
    paper = np.repeat((1.0 - np.clip(image, 0.0, 1.0))[..., None], 3, axis=2)
    # the classic jet colour ramp (blue -> cyan -> yellow -> red)
    ramp = np.stack([np.clip(1.5 - np.abs(4 * value - k), 0.0, 1.0) for k in (3, 2, 1)], axis=-1)
    weight = (strength * value)[..., None]  # faint attention stays faint: the paper shows through
    rgb = paper * (1.0 - weight) + ramp * weight
    return Image.fromarray((rgb * 255).round().astype(np.uint8), mode="RGB")


def captioned(picture: Image.Image, caption: str) -> Image.Image:
    """The picture with a white band underneath holding ``caption``."""
    out = Image.new("RGB", (max(picture.width, 120), picture.height + CAPTION_HEIGHT), "white")
    out.paste(picture, (0, 0))
    ImageDraw.Draw(out).text((4, picture.height + 4), caption, fill="black", font=_font(18))
    return out


def contact_strip(tiles: list[Image.Image], title: str) -> Image.Image:
    """Every token's picture scaled to :data:`TILE_WIDTH`, in rows of :data:`STRIP_COLUMNS`, under a title."""
    scaled = [t.resize((TILE_WIDTH, max(1, round(t.height * TILE_WIDTH / t.width))), Image.LANCZOS) for t in tiles]
    columns = max(1, min(STRIP_COLUMNS, len(scaled)))
    rows = (len(scaled) + columns - 1) // columns
    cell = max((t.height for t in scaled), default=1)
    gap, top = 6, 32
    out = Image.new("RGB", (columns * (TILE_WIDTH + gap) + gap, top + rows * (cell + gap)), (235, 235, 235))
    ImageDraw.Draw(out).text((gap, 6), title, fill="black", font=_font(18))
    for i, tile in enumerate(scaled):
        out.paste(tile, (gap + (i % columns) * (TILE_WIDTH + gap), top + (i // columns) * (cell + gap)))
    return out


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 ships a scalable default font
    except TypeError:
        return ImageFont.load_default()


def _file_name(token: str) -> str:
    name = re.sub(r"[^A-Za-z0-9]+", "", token)
    return name or "u" + "-".join(f"{ord(c):x}" for c in token)
