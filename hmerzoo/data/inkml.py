"""InkML files -> offline images like the shipped CROHME ones, and their LaTeX labels.

An InkML file holds pen strokes (``<trace>``: ``x y [t ...], x y ...``), the expression's LaTeX in an
``<annotation>`` (CROHME 2014-2023: ``type="truth"``; MathWriting: ``type="normalizedLabel"``, else ``label``) and,
in CROHME, symbol groups (``<traceGroup>`` with their own ``truth``).

:func:`render` draws the strokes the way the WAP/BTTR/CoMER offline CROHME images look: white ink on black,
binarised, strokes :attr:`RenderSettings.stroke_width` px wide, a :attr:`RenderSettings.margin` px margin, the
expression scaled so its symbols' root-mean-square height is :attr:`RenderSettings.symbol_height` px. Without
symbol groups (MathWriting) a symbol's height is estimated from the strokes' heights.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError

# annotation types holding the expression's LaTeX, the first found wins
LABEL_TYPES = ("truth", "normalizedLabel", "label")
# a stroke is on average this fraction of its symbol's height (CROHME's symbol groups, measured): the estimate of
# symbol height for ink without symbol groups
STROKE_TO_SYMBOL_HEIGHT = 0.7


@dataclass(frozen=True)
class RenderSettings:
    """How strokes become pixels; :meth:`key` names a render cache."""

    stroke_width: float = 3.5  # px, in the output image
    symbol_height: float = 32.0  # px, RMS height of the symbols
    margin: int = 12  # px of black around the ink
    supersample: int = 4  # drawn this many times larger, then reduced and thresholded (smooth, still binary)
    max_side: int = 4096  # px: a bigger drawing is scaled down to fit (stray far-away points)

    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Ink:
    """One InkML file: strokes (arrays of (x, y) points), its LaTeX label (or None), its symbols' stroke lists."""

    strokes: list[np.ndarray]
    label: str | None
    symbols: list[list[int]]  # indices into strokes, one list per symbol


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _points(text: str | None, where: str) -> np.ndarray:
    rows = []
    for point in (text or "").split(","):
        values = point.split()
        if len(values) >= 2:
            try:
                rows.append((float(values[0]), float(values[1])))
            except ValueError:
                raise DataError(f"{where}: a trace point is not numbers: '{point.strip()[:40]}'") from None
    return np.asarray(rows, dtype=np.float64).reshape(-1, 2)


def parse_inkml(data: bytes, where: str = "<inkml>") -> Ink:
    """Strokes, label and symbols of an InkML document (namespaced or not)."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise DataError(f"{where}: not valid InkML/XML ({e})") from None
    strokes: list[np.ndarray] = []
    index_of: dict[str, int] = {}
    labels: dict[str, str] = {}
    for element in root:  # the expression's annotations are the root's children; symbols have their own
        kind = element.get("type")
        if _local(element.tag) == "annotation" and kind in LABEL_TYPES and kind not in labels:
            labels[kind] = (element.text or "").strip()
    for element in root.iter():
        if _local(element.tag) == "trace":
            trace_id = element.get("id") or element.get("{http://www.w3.org/XML/1998/namespace}id")
            if trace_id is not None:
                index_of[trace_id] = len(strokes)
            strokes.append(_points(element.text, where))
    symbols = []
    for element in root.iter():
        if _local(element.tag) != "traceGroup":
            continue
        refs = [child.get("traceDataRef") for child in element if _local(child.tag) == "traceView"]
        has_label = any(_local(child.tag) == "annotation" for child in element)
        members = [index_of[r] for r in refs if r in index_of]
        if members and has_label:
            symbols.append(members)
    label = next((labels[k] for k in LABEL_TYPES if labels.get(k)), None)
    return Ink(strokes=strokes, label=label, symbols=symbols)


def read_label(data: bytes, where: str = "<inkml>") -> str | None:
    """Only the expression's label: the file is read up to its first trace (labels come first), not drawn."""
    labels: dict[str, str] = {}
    depth = 0
    try:
        for event, element in ET.iterparse(io.BytesIO(data), events=("start", "end")):
            if event == "start":
                depth += 1
                continue
            depth -= 1
            tag, kind = _local(element.tag), element.get("type")
            if tag == "trace":
                break
            if tag == "annotation" and depth == 1 and kind in LABEL_TYPES and kind not in labels:
                labels[kind] = (element.text or "").strip()
    except ET.ParseError as e:
        raise DataError(f"{where}: not valid InkML/XML ({e})") from None
    return next((labels[k] for k in LABEL_TYPES if labels.get(k)), None)


def read_inkml(path: str | Path) -> Ink:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    return parse_inkml(data, str(path))


def symbol_height(ink: Ink) -> float:
    """RMS height of the symbols in ink units (estimated from stroke heights when there are no symbol groups)."""
    heights = []
    for members in ink.symbols:
        ys = np.concatenate([ink.strokes[i][:, 1] for i in members if len(ink.strokes[i])] or [np.zeros(0)])
        if len(ys):
            heights.append(float(ys.max() - ys.min()))
    if not heights or not any(heights):
        heights = [float(s[:, 1].max() - s[:, 1].min()) / STROKE_TO_SYMBOL_HEIGHT for s in ink.strokes if len(s)]
    return math.sqrt(sum(h * h for h in heights) / len(heights)) if heights else 0.0


def render(ink: Ink, settings: RenderSettings = RenderSettings()) -> np.ndarray:
    """The strokes as a uint8 [h, w] image, 255 ink on 0, binarised; deterministic for given ink and settings."""
    strokes = [s for s in ink.strokes if len(s)]
    if not strokes:
        raise DataError("the InkML has no stroke points to draw")
    points = np.concatenate(strokes)
    low, span = points.min(axis=0), points.max(axis=0) - points.min(axis=0)
    height = symbol_height(ink)
    scale = settings.symbol_height / height if height > 0 else 1.0
    # the ink's edge lies half a stroke outside the centre line: the margin is counted from the edge
    pad = settings.margin + settings.stroke_width / 2
    fit = (settings.max_side - 2 * pad) / max(span.max() * scale, 1e-9)
    scale *= min(1.0, fit)
    width_px, height_px = (int(math.ceil(v * scale + 2 * pad)) for v in span)
    k = settings.supersample
    canvas = Image.new("L", (width_px * k, height_px * k), 0)
    draw = ImageDraw.Draw(canvas)
    radius = settings.stroke_width * k / 2
    for stroke in strokes:
        xy = [(float(x), float(y)) for x, y in ((stroke - low) * scale + pad) * k]
        if len(xy) > 1:
            draw.line(xy, fill=255, width=max(1, round(settings.stroke_width * k)), joint="curve")
        for x, y in (xy[0], xy[-1]):  # round pen tips (and dots: one-point strokes)
            draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=255)
    small = np.asarray(canvas.reduce(k)) if k > 1 else np.asarray(canvas)
    return np.where(small >= 128, 255, 0).astype(np.uint8)


def encode_bmp(image: np.ndarray) -> bytes:
    """An 8-bit grayscale BMP of ``image`` (the shipped CROHME images' file format)."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="BMP")
    return buffer.getvalue()
