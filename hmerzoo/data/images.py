"""Turning image files, PIL images and arrays into the tensors models read.

Convention (BTTR/CoMER/CROHME): white ink on black, 8-bit gray, scaled to [0, 1] with no mean/std normalisation.
Nothing here inverts polarity: a black-on-white photo must be inverted by the caller.
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
