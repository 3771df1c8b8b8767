"""What the demo page's JSON endpoint does with one uploaded image: check it, prepare it, decode it.

Kept apart from the HTTP plumbing (:mod:`hmerzoo.demo.server`) so it can be used and tested without a socket.
"""
from __future__ import annotations

import base64
import hashlib
import io
import threading
from typing import Any, Callable

import torch
from PIL import Image

from .. import runtime
from ..data.images import prepare_image, size_ranges_for_recipe
from ..decoding.modes import length_normalised
from ..errors import DataError
from ..predict import decode_settings

# An upload larger than this is refused before it is decoded (a phone photo is a few MB; a formula needs far less).
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# Pixels: refused before decoding the pixel data, so a small file that unpacks into a huge bitmap cannot exhaust
# memory (PIL's own decompression-bomb limit is larger than a demo needs).
MAX_PIXELS = 6000 * 6000
# How many hypotheses the page lists at most.
MAX_TOP_K = 20

# The attention strip: a callable (model, prepared image [1,h,w], recognition) -> PNG bytes, or None.
# hmerzoo's attention pictures live elsewhere; whoever has them sets this hook (DemoService(attention=...)),
# and the page shows the strip when the JSON carries one ("attention": a data: URL).
AttentionStrip = Callable[[Any, torch.Tensor, Any], bytes]


class UploadError(DataError):
    """An upload the demo refuses; ``status`` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _ranking(mode: str, alpha: float) -> Callable[[list[Any]], torch.Tensor]:
    """The score each hypothesis is ranked by in the final choice of ``mode`` (see hmerzoo.decoding.modes)."""
    if mode == "comer":  # first pass + rating, already summed in .score
        return lambda hyps: torch.tensor([h.score for h in hyps], dtype=torch.float32)
    if mode == "abm":  # per emitted token: the stop token counts when the hypothesis finished
        def per_emitted(hyps: list[Any]) -> torch.Tensor:
            lengths = torch.tensor([float(len(h.tokens) + int(h.finished)) ** alpha for h in hyps])
            return torch.tensor([h.score for h in hyps], dtype=torch.float32) / lengths.clamp_min(1.0)
        return per_emitted
    return lambda hyps: length_normalised(hyps, alpha)


def open_upload(data: bytes) -> Image.Image:
    """The uploaded bytes as a loaded PIL image, or an :class:`UploadError` that says what is wrong."""
    if not data:
        raise UploadError("the upload is empty: draw a formula or choose an image file")
    if len(data) > MAX_UPLOAD_BYTES:
        raise UploadError(f"the upload is too large ({len(data) / 1e6:.1f} MB; at most "
                          f"{MAX_UPLOAD_BYTES / 1e6:.0f} MB)", status=413)
    try:
        img = Image.open(io.BytesIO(data))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise UploadError("the upload is not an image (expected PNG, JPEG, BMP, TIFF, ...)") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise UploadError(f"the image is too large ({w}x{h} pixels; at most {MAX_PIXELS // 1_000_000} "
                          "megapixels)", status=413)
    if w == 0 or h == 0:
        raise UploadError(f"the image is empty ({w}x{h} pixels)")
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise UploadError(f"the image cannot be decoded ({type(e).__name__}: {e})") from None
    return img


def _png_data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class DemoService:
    """One loaded model and its decode settings; :meth:`recognize_bytes` answers one request.

    ``decode`` overrides the recipe's ``decode:`` values (beam_size, max_len, mode, ...). Requests are decoded one
    at a time (a lock): the model is shared by the server's threads.
    """

    def __init__(self, model: Any, decode: dict[str, Any] | None = None, attention: AttentionStrip | None = None,
                 name: str = "") -> None:
        self.model = model.eval()
        self.decode = decode_settings(model, **(decode or {}))
        self.decode["batching"] = "per_image"  # one image a request: its result never depends on other requests
        self.ranges = size_ranges_for_recipe(getattr(model, "recipe", None))
        self.attention = attention
        self.name = name
        self._lock = threading.Lock()

    def info(self) -> dict[str, Any]:
        return {"model": self.name, "decode": self.decode, "attention": self.attention is not None,
                "max_upload_bytes": MAX_UPLOAD_BYTES}

    def recognize_bytes(self, data: bytes, top_k: int | None = None) -> dict[str, Any]:
        """The JSON answer for one encoded image: ``latex``, ``tokens``, ``score``, ``hypotheses`` (best first,
        each ``{latex, score, direction}``, one per distinct LaTeX), ``attention`` (a PNG data: URL or null),
        ``input_sha256`` (of the bytes received), ``size`` (of the image as received) and ``model_input`` (the
        prepared image the model read, a PNG data: URL)."""
        img = open_upload(data)
        size = list(img.size)
        try:
            image = prepare_image(img, **self.ranges)
        except DataError as e:
            raise UploadError(str(e)) from None
        with self._lock, torch.no_grad(), runtime.inference_settings():
            device = next(self.model.parameters()).device
            rec = self.model.recognize([image.to(device)], **self.decode)[0]
            attention = self.attention(self.model, image, rec) if self.attention is not None else None
        k = max(1, min(int(top_k or self.decode["beam_size"]), MAX_TOP_K))
        # what the model read, shown on the page: white ink on black, rescaled into the model's size range
        seen = Image.fromarray((image[0].clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy())
        return {
            "latex": rec.latex, "tokens": [int(t) for t in rec.tokens], "score": float(rec.score),
            "hypotheses": self._hypotheses(rec, k),
            "attention": "data:image/png;base64," + base64.b64encode(attention).decode() if attention else None,
            "input_sha256": hashlib.sha256(data).hexdigest(), "size": size,
            "model_input": _png_data_url(seen),
        }

    def _hypotheses(self, rec: Any, k: int) -> list[dict[str, Any]]:
        """The chosen hypothesis, then the others by the mode's final ranking; a LaTeX string found by both
        directions is listed once, with its better score."""
        chosen = {"latex": rec.latex, "score": float(rec.score), "direction": None}
        hyps = list(rec.hypotheses)
        if hyps:
            ranking = _ranking(self.decode["mode"], float(self.decode["alpha"]))(hyps).tolist()
            order = sorted(range(len(hyps)), key=lambda i: -ranking[i])
            for i in order:
                if hyps[i].tokens == list(rec.tokens):
                    chosen["direction"] = hyps[i].direction
                    break
        out, seen = [chosen], {rec.latex}
        for i in (order if hyps else []):
            latex = self.model.vocab.to_latex(hyps[i].tokens)
            if latex in seen:
                continue
            seen.add(latex)
            out.append({"latex": latex, "score": float(ranking[i]), "direction": hyps[i].direction})
            if len(out) >= k:
                break
        return out
