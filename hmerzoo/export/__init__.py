"""Models outside PyTorch: ``export_onnx`` writes a model's ONNX graphs (:mod:`.onnx`, :mod:`.graphs`);
``load_onnx_model`` runs them with onnxruntime and hmerzoo's own search (:mod:`.runtime`). Both need the [onnx]
extra; importing this package does not."""
from __future__ import annotations

from .onnx import export_onnx, require_onnx

__all__ = ["export_onnx", "require_onnx", "load_onnx_model"]


def load_onnx_model(directory, threads=None):
    from .runtime import load_onnx_model as load

    return load(directory, threads=threads)
