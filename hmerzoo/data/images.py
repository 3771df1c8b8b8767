"""Turning image files, PIL images and arrays into the tensors models read.

Convention (BTTR/CoMER/CROHME): white ink on black, 8-bit gray, scaled to [0, 1] with no mean/std normalisation.
:func:`load_image_tensor` (datasets, ``model.score``) converts only; :func:`prepare_image` (predict) also fixes what
real user images get wrong: black-on-white polarity, grey paper, sizes outside the model's range.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

# Exceptions PIL raises for truncated, corrupt or unknown image data.
_PIL_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _pil_to_gray_uint8(img: Image.Image) -> np.ndarray:
    """Any PIL image -> HxW uint8 gray array (alpha is ignored; 16-bit and float modes are rescaled)."""
    if img.mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.round(np.asarray(img, dtype=np.float64) / 65535.0 * 255.0).clip(0, 255).astype(np.uint8)
    if img.mode in ("I", "F"):
        return _float_to_uint8(np.asarray(img, dtype=np.float64))
    # "1", "P", "RGB", "RGBA", "LA", "CMYK", ...: PIL's own ITU-R 601 luma conversion
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return np.asarray(img.convert("L"), dtype=np.uint8)


def _float_to_uint8(arr: np.ndarray) -> np.ndarray:
    scaled = _float_to_unit(arr)
    return np.round(scaled * 255.0).astype(np.uint8)


def _float_to_unit(arr: np.ndarray) -> np.ndarray:
    """Float pixels -> [0, 1]: values above 1 are taken as 0..255 (the usual case after cv2/numpy arithmetic)."""
    arr = np.nan_to_num(arr.astype(np.float32, copy=False), nan=0.0)
    if arr.size and float(arr.max()) > 1.0:
        arr = arr / 255.0
    return np.clip(arr, 0.0, 1.0)


def read_image_bytes(data: bytes, where: str) -> np.ndarray:
    """Decode an encoded image (BMP, PNG, JPEG, ...) to an HxW uint8 gray array.

    ``where`` names the file or zip member in the DataError raised when the bytes do not decode.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return _pil_to_gray_uint8(img)
    except _PIL_ERRORS as e:
        raise DataError(f"{where}: cannot read the image ({type(e).__name__}: {e})") from None


def read_image_size(fileobj: IO[bytes] | str | os.PathLike, where: str) -> tuple[int, int]:
    """(height, width) from the image header only: PIL opens lazily, so the pixels are never decoded."""
    try:
        with Image.open(fileobj) as img:
            width, height = img.size
    except _PIL_ERRORS as e:
        raise DataError(f"{where}: cannot read the image ({type(e).__name__}: {e})") from None
    if width <= 0 or height <= 0:
        raise DataError(f"{where}: the image has an empty size {width}x{height}")
    return height, width


def array_to_tensor(arr: np.ndarray, where: str = "image") -> torch.Tensor:
    """numpy image (HxW or HxWxC; uint8, uint16, bool or float) -> [1, h, w] float32 in [0, 1]."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 3 and arr.shape[2] not in (3, 4):
        raise DataError(f"{where}: expected 1, 3 or 4 channels (HxWxC), got shape {arr.shape}")
    if arr.ndim not in (2, 3):
        raise DataError(f"{where}: expected an HxW or HxWxC image, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{where}: the image is empty (shape {arr.shape})")
    if arr.ndim == 3 and arr.dtype == np.uint8:
        # PIL's convert("L") rounding, so an RGB array and the same image as a PIL RGB image agree exactly
        arr = np.asarray(Image.fromarray(np.ascontiguousarray(arr[:, :, :3])).convert("L"))
    unit = _to_unit(arr, where)
    if unit.ndim == 3:
        unit = unit[:, :, :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, alpha dropped
    return torch.from_numpy(np.ascontiguousarray(unit, dtype=np.float32)).unsqueeze(0)


def _to_unit(arr: np.ndarray, where: str) -> np.ndarray:
    """Pixels of any supported type -> float32 in [0, 1]."""
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    if np.issubdtype(arr.dtype, np.integer):
        return np.clip(arr.astype(np.float32), 0, 255) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        return _float_to_unit(arr)
    raise DataError(f"{where}: unsupported pixel type {arr.dtype}")


def load_image_tensor(img: Any) -> torch.Tensor:
    """A PIL image, numpy array, torch tensor or file path -> [1, h, w] float32 in [0, 1], gray.

    RGB/RGBA inputs become gray (alpha ignored). Polarity is left as it is (white ink on black expected).
    """
    if isinstance(img, (str, os.PathLike)):
        path = Path(img)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"{path}: cannot read the image file ({e.strerror or e})") from None
        return array_to_tensor(read_image_bytes(data, where=str(path)), where=str(path))
    if isinstance(img, Image.Image):
        return array_to_tensor(_pil_to_gray_uint8(img))
    if isinstance(img, torch.Tensor):
        t = img.detach().cpu()
        if t.ndim == 3 and t.shape[0] in (1, 3, 4) and t.shape[-1] not in (1, 3, 4):
            t = t.permute(1, 2, 0)  # CxHxW -> HxWxC
        return array_to_tensor(t.numpy(), where="tensor image")
    if isinstance(img, np.ndarray):
        return array_to_tensor(img)
    raise TypeError(f"load_image_tensor: expected a PIL image, numpy array, tensor or path, got {type(img).__name__}")


# --- real user images -------------------------------------------------------------------------------------------
# CoMER's ScaleToLimitRange ranges: what models trained with data.scale_to_limit=true saw.
COMER_HEIGHT_RANGE = (16, 256)
COMER_WIDTH_RANGE = (16, 1024)
# Models trained on images at their own size (BTTR: data.scale_to_limit=false): wide enough that every CROHME test
# image (at most 375 px high, 1734 px wide) passes unchanged; the lower bound is one cell of the stride-16 encoder.
NATIVE_HEIGHT_RANGE = (16, 512)
NATIVE_WIDTH_RANGE = (16, 2048)

ENHANCE_MODES = ("none", "stretch", "binarize")

# Below this scale a bilinear resize without antialiasing samples past whole strokes, so area averaging is used.
_AREA_BELOW_SCALE = 0.5
# A stretch needs at least this much contrast (in [0, 1]) between background and ink; less is a blank image,
# where stretching would only amplify sensor noise.
_MIN_CONTRAST = 0.15
# An image with a black background and ink at least this bright already looks like training data.
_LOOKS_FINE_INK = 0.8 * 255.0


def size_ranges_for_recipe(recipe: dict | None) -> dict[str, tuple[int, int]]:
    """``prepare_image``'s ``height_range`` / ``width_range`` for a model, from its recipe's ``data:`` section.

    ``data.scale_to_limit: true`` -> CoMER's ranges (the model trained on them); otherwise the wider native ranges.
    """
    data = (recipe or {}).get("data") or {}
    if data.get("scale_to_limit"):
        return {"height_range": COMER_HEIGHT_RANGE, "width_range": COMER_WIDTH_RANGE}
    return {"height_range": NATIVE_HEIGHT_RANGE, "width_range": NATIVE_WIDTH_RANGE}


def _user_pil_to_gray(img: Image.Image) -> np.ndarray:
    """A decoded user image -> HxW uint8 gray array.

    Unlike :func:`_pil_to_gray_uint8` (the dataset path), this follows the EXIF orientation of phone photos, puts
    transparent pixels on a background that contrasts with the ink (black strokes on a transparent canvas would
    otherwise be black on black), and reads 16-bit PNGs that PIL opens as 32-bit mode "I".
    """
    from PIL import ImageOps

    try:
        img = ImageOps.exif_transpose(img)
    except (OSError, ValueError, KeyError, TypeError, SyntaxError):
        pass  # a damaged EXIF block: the pixels are still fine, only the orientation tag is lost
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (img.mode == "P" and "transparency" in img.info)
    if has_alpha:
        gray_alpha = np.asarray(img.convert("RGBA").convert("LA"), dtype=np.float32)
        luma, alpha = gray_alpha[:, :, 0], gray_alpha[:, :, 1] / 255.0
        if float(alpha.min()) < 1.0:
            opaque = luma[alpha > 0.5]
            dark_ink = opaque.size == 0 or float(np.median(opaque)) < 128.0
            background = 255.0 if dark_ink else 0.0
            luma = luma * alpha + background * (1.0 - alpha)
        return np.round(luma).clip(0, 255).astype(np.uint8)
    if img.mode == "I":
        values = np.asarray(img, dtype=np.float64)
        # 16-bit gray PNGs arrive as mode "I" with values up to 65535; true 8-bit data stays as it is
        full_scale = 65535.0 if values.size and float(values.max()) > 255.0 else 255.0
        return np.round(values.clip(0, full_scale) / full_scale * 255.0).astype(np.uint8)
    return _pil_to_gray_uint8(img)


def _read_user_image(img: Any) -> tuple[np.ndarray, torch.Tensor | None]:
    """(HxW gray array, or the tensor ``load_image_tensor`` gives when the array came from one)."""
    if isinstance(img, (str, os.PathLike)):
        path = Path(img)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"{path}: cannot read the image file ({e.strerror or e})") from None
        try:
            with Image.open(io.BytesIO(data)) as pil:
                pil.load()
                gray = _user_pil_to_gray(pil)
        except UnidentifiedImageError:
            raise DataError(f"{path}: cannot read the image (not an image format PIL knows; expected PNG, JPEG, "
                            "BMP, TIFF, ...)") from None
        except _PIL_ERRORS as e:
            raise DataError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
        if gray.size == 0:
            raise DataError(f"{path}: the image is empty ({gray.shape[1]}x{gray.shape[0]})")
        return gray, None
    if isinstance(img, Image.Image):
        return _user_pil_to_gray(img), None
    if isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 2:
        return img, None
    # any other array or tensor: load_image_tensor's conversion, kept so an untouched image comes back as it gave it
    tensor = load_image_tensor(img)
    return tensor[0].numpy(), tensor


def looks_black_on_white(gray: np.ndarray) -> bool:
    """True when the ink is darker than the background.

    Ink covers a small part of a formula image, so the median pixel is background; the ink sits at whichever
    extreme (0.1th or 99.9th percentile) lies farther from it. Unlike "is the background bright?", this also holds
    for dim photos of paper (paper at 100, pencil at 30) and for chalk on a blackboard. A blank image counts as
    black-on-white when it is bright.
    """
    darkest, background, brightest = (float(v) for v in np.percentile(gray, [0.1, 50.0, 99.9]))
    below, above = background - darkest, brightest - background
    if below == above:
        full_scale = 255.0 if gray.dtype == np.uint8 else 1.0
        return background > full_scale / 2
    return below > above


def _fit_scale(h: int, w: int, height_range: tuple[int, int], width_range: tuple[int, int]) -> float:
    """CoMER's ScaleToLimitRange rule: shrink until both sides fit their maximum, else grow until both reach their
    minimum; growing stops at the maxima (an extreme aspect ratio is padded afterwards instead)."""
    fit_max = min(height_range[1] / h, width_range[1] / w)
    if fit_max < 1.0:
        return fit_max
    reach_min = max(height_range[0] / h, width_range[0] / w)
    if reach_min > 1.0:
        return min(reach_min, fit_max)
    return 1.0


def _resize_gray(gray: np.ndarray, scale: float) -> np.ndarray:
    """Uniform resize of a uint8 HxW image; the result stays 8-bit, as every training image was."""
    from .transforms import resize_like_cv2

    h, w = gray.shape
    x = torch.from_numpy(gray.astype(np.float32) / 255.0)[None]
    if scale >= _AREA_BELOW_SCALE:
        out = resize_like_cv2(x, scale, scale, quantize=True)  # the resize ScaleToLimitRange does in training
    else:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        out = torch.nn.functional.interpolate(x[None], size=size, mode="area")[0]
    return np.round(out[0].numpy().clip(0.0, 1.0) * 255.0).astype(np.uint8)


def _otsu_threshold(gray: np.ndarray) -> int:
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    mass_low = np.cumsum(hist * levels)
    mean_low = mass_low / np.maximum(weight_low, 1.0)
    mean_high = (mass_low[-1] - mass_low) / np.maximum(weight_high, 1.0)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return int(np.argmax(between))


def _enhance(gray: np.ndarray, enhance: str) -> np.ndarray:
    """Light contrast fix of a white-on-black uint8 image (see :func:`prepare_image`)."""
    if enhance == "none":
        return gray
    background = float(np.median(gray))  # ink covers a small part of a formula image
    ink = float(np.percentile(gray, 99.9))
    if ink - background < _MIN_CONTRAST * 255.0:
        if background <= 0.0:
            return gray
        # a (nearly) blank image: only darken the background to black; a gain would magnify noise into "ink"
        return np.clip(gray.astype(np.int16) - int(round(background)), 0, 255).astype(np.uint8)
    if enhance == "binarize":
        threshold = _otsu_threshold(gray)
        return np.where(gray > threshold, 255, 0).astype(np.uint8)
    if background <= 0.0 and ink >= _LOOKS_FINE_INK:
        return gray  # black background, bright ink (every CROHME image, also after ScaleToLimitRange): left as is
    stretched = (gray.astype(np.float32) - background) / (ink - background)
    return np.round(stretched.clip(0.0, 1.0) * 255.0).astype(np.uint8)


def _pad_to_minimum(gray: np.ndarray, height_range: tuple[int, int], width_range: tuple[int, int]) -> np.ndarray:
    h, w = gray.shape
    pad_h, pad_w = max(0, height_range[0] - h), max(0, width_range[0] - w)
    if not pad_h and not pad_w:
        return gray
    # centred, with background (0): the ink keeps its shape instead of being stretched to the minimum
    return np.pad(gray, ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2)))


def prepare_image(img: Any, height_range: tuple[int, int] = COMER_HEIGHT_RANGE,
                  width_range: tuple[int, int] = COMER_WIDTH_RANGE, invert: bool | None = None,
                  enhance: str = "stretch") -> torch.Tensor:
    """A real user image (path, PIL image, array or tensor) -> [1, h, w] float32 in [0, 1], white ink on black.

    Steps, each skipped when it has nothing to do:

    1. **gray**: PNG/JPEG/BMP/TIFF, RGB/RGBA/gray/palette/16-bit; EXIF rotation applied; transparent pixels laid on a
       background that contrasts with the ink.
    2. **polarity**: ``invert=None`` detects black ink on white (:func:`looks_black_on_white`) and inverts it;
       ``True``/``False`` force it.
    3. **size**: scaled uniformly so the height fits ``height_range`` and the width ``width_range`` (CoMER's
       ScaleToLimitRange rule, with its bilinear resize; area averaging below half size, where bilinear would drop
       strokes). A side still short of its minimum (an extreme aspect ratio, a tiny image) is padded with
       background, centred, rather than stretched.
    4. **enhance**: ``"stretch"`` (default) maps the background level (the median) to 0 and the ink level (99.9th
       percentile) to 1, so grey paper and faint or downscaled strokes look like training data; ``"binarize"``
       thresholds at Otsu's level; ``"none"`` skips it. An image with a black background and ink above 80 %
       brightness is left as it is; one with almost no contrast (a blank page) only has its background subtracted.

    An image already white-on-black, with a black background and in range (every CROHME image) comes back
    bit-identical to :func:`load_image_tensor`. The output is a fixed point: preparing it again (with the same
    ranges) changes nothing. Unreadable files raise :class:`DataError` naming the file.
    """
    if enhance not in ENHANCE_MODES:
        raise ValueError(f"prepare_image: enhance must be one of {', '.join(ENHANCE_MODES)}, got {enhance!r}")
    for name, (lo, hi) in (("height_range", height_range), ("width_range", width_range)):
        if not 0 < lo <= hi:
            raise ValueError(f"prepare_image: {name} must be (lo, hi) with 0 < lo <= hi, got ({lo}, {hi})")
    gray, loaded = _read_user_image(img)
    if gray.dtype != np.uint8:
        gray = np.round(np.clip(gray, 0.0, 1.0) * 255.0).astype(np.uint8)  # every later step works on 8-bit

    changed = False
    if invert if invert is not None else looks_black_on_white(gray):
        gray = 255 - gray
        changed = True
    h, w = gray.shape
    scale = _fit_scale(h, w, height_range, width_range)
    if scale != 1.0:
        gray = _resize_gray(gray, scale)
        changed = True
    enhanced = _enhance(gray, enhance)
    changed = changed or enhanced is not gray
    padded = _pad_to_minimum(enhanced, height_range, width_range)
    changed = changed or padded is not enhanced

    if not changed and loaded is not None:
        return loaded  # an untouched float or 16-bit input keeps its full precision
    return array_to_tensor(padded)
