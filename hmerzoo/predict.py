"""``hmerzoo predict``: LaTeX for your own image files.

Every image goes through :func:`~hmerzoo.data.images.prepare_image` (gray, black-on-white inverted, sizes brought
into the model's range) and then ``model.recognize``. A file that cannot be read is reported and skipped; the
others are still recognised, and the exit status says that something failed.

Output, one line per image in the order given (``--dir`` files sorted by name, after the named files):

* plain: ``image<TAB>latex`` on stdout; a failed image prints ``error: <message naming the file>`` on stderr.
* ``--json``: one JSON object per line on stdout, ``{"image", "latex", "tokens", "score"}``; a failed image gives
  ``{"image", "error"}`` there too (and the stderr line), so a consumer reading stdout sees every input once.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import torch

from .config import DecodeConfig, check_section
from .data.images import prepare_image, size_ranges_for_recipe
from . import runtime
from .errors import DataError, HmerzooError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

# exit status when some images could not be recognised (2 stays the CLI's "nothing could run" status)
EXIT_SOME_FAILED = 1


@dataclass
class Prediction:
    """The result for one image file: ``latex``/``tokens``/``score``, or ``error`` when it could not be read."""

    image: str
    latex: str | None = None
    tokens: list[int] = field(default_factory=list)
    score: float | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        if self.error is not None:
            return {"image": self.image, "error": self.error}
        return {"image": self.image, "latex": self.latex, "tokens": self.tokens, "score": self.score}


def resolve_device(name: str) -> torch.device:
    """The ``--device`` of predict/eval (the runtime's rules: ``auto``, ``cpu``, ``cuda``, ``cuda:N``)."""
    return runtime.resolve_device(name, setting="--device")


def decode_settings(model: Any, beam_size: int | None = None, max_len: int | None = None,
                    alpha: float | None = None, mode: str | None = None, batching: str | None = None,
                    batch_size: int | None = None) -> dict[str, Any]:
    """The model's recipe ``decode:`` section with the given (non-None) values on top, every key filled in.

    Resolved (and checked) here rather than left to ``recognize`` so a wrong value fails before any image is read
    and what ran can be written down (eval's summary.json).
    """
    from .decoding.recognize import decode_config

    recipe = getattr(model, "recipe", None)
    problems = check_section(DecodeConfig, (recipe or {}).get("decode"), "decode")
    if problems:
        raise HmerzooError("the model's recipe: " + "; ".join(problems))
    try:
        config = decode_config(recipe, beam_size=beam_size, max_len=max_len, alpha=alpha, mode=mode,
                               batching=batching, batch_size=batch_size)
    except (ValueError, NotImplementedError) as e:  # an unknown or not yet implemented mode, a bad batching
        raise HmerzooError(str(e)) from None
    return dataclasses.asdict(config)


def collect_images(images: Sequence[str | os.PathLike], directory: str | os.PathLike | None = None) -> list[str]:
    """The named images (as given, even unreadable ones: they are reported later), then ``directory``'s image files
    (by suffix, sorted by name)."""
    found = [str(p) for p in images]
    if directory is not None:
        folder = Path(directory)
        if not folder.is_dir():
            raise DataError(f"--dir {folder}: not a directory")
        found += [str(p) for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        where = f" (no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files in {directory})" if directory else ""
        raise DataError(f"no images to recognise{where}; give image files and/or --dir DIR")
    return found


def predict_files(model: Any, paths: Sequence[str], decode: dict[str, Any],
                  height_range: tuple[int, int] | None = None, width_range: tuple[int, int] | None = None,
                  enhance: str = "stretch") -> Iterator[Prediction]:
    """Recognise image files, ``decode["batch_size"]`` at a time, yielding one :class:`Prediction` per path in order.

    ``height_range``/``width_range`` default to the model's (:func:`size_ranges_for_recipe`). Files are prepared
    here, one by one, so an unreadable one becomes that file's error instead of failing its chunk; ``recognize``
    prepares the tensors again with the model's ranges, which changes nothing (the output is a fixed point) unless
    the ranges given here are wider than the model's.
    """
    ranges = size_ranges_for_recipe(getattr(model, "recipe", None))
    height_range = height_range or ranges["height_range"]
    width_range = width_range or ranges["width_range"]
    chunk_size = int(decode["batch_size"])
    for start in range(0, len(paths), chunk_size):
        chunk = paths[start:start + chunk_size]
        results: list[Prediction] = [Prediction(image=p) for p in chunk]
        images, slots = [], []
        for slot, path in enumerate(chunk):
            try:
                image = prepare_image(path, height_range=height_range, width_range=width_range, enhance=enhance)
            except DataError as e:
                results[slot].error = str(e)
                continue
            images.append(image)  # on the CPU: recognize moves it to the device once
            slots.append(slot)
        if images:
            recognitions = model.recognize(images, **decode)
            for slot, rec in zip(slots, recognitions):
                results[slot].latex = rec.latex
                results[slot].tokens = [int(t) for t in rec.tokens]
                results[slot].score = float(rec.score)
        yield from results


def run_predict(model_path: str, images: Sequence[str], directory: str | None = None, beam_size: int | None = None,
                as_json: bool = False, device: str = "auto", mode: str | None = None, max_len: int | None = None,
                out: IO[str] | None = None, err: IO[str] | None = None, attention: str | None = None,
                backend: str = "torch") -> int:
    """The ``hmerzoo predict`` command; returns the exit status (0, or 1 when some image failed).

    ``attention``: a directory for attention pictures (:mod:`hmerzoo.attention_maps`) of every recognised image.
    ``backend``: ``torch``, or ``onnxruntime`` with ``model_path`` an ONNX export (:mod:`hmerzoo.export`)."""
    from .builder import load_model

    out = out or sys.stdout
    err = err or sys.stderr
    paths = collect_images(images, directory)  # before loading the model: a wrong --dir fails fast
    if backend == "onnxruntime":
        if attention is not None:
            raise HmerzooError("--attention needs the torch backend (the ONNX graphs return no attention maps)")
        from .export.runtime import load_onnx_model

        model = load_onnx_model(model_path)
    else:
        model = load_model(model_path, map_location=resolve_device(device))
    decode = decode_settings(model, beam_size=beam_size, mode=mode, max_len=max_len)
    failed = 0
    with runtime.inference_settings():  # TF32 matmuls on GPUs that have them
        for prediction in predict_files(model, paths, decode):
            if prediction.error is not None:
                failed += 1
                print(f"error: {prediction.error}", file=err, flush=True)
            if as_json:
                print(json.dumps(prediction.to_json(), ensure_ascii=False), file=out, flush=True)
            elif prediction.error is None:
                print(f"{prediction.image}\t{prediction.latex}", file=out, flush=True)
            if attention is not None and prediction.error is None:
                _write_attention(model, prediction.image, Path(attention), len(paths) > 1, decode)
    if failed:
        print(f"{failed} of {len(paths)} images could not be read", file=err, flush=True)
        return EXIT_SOME_FAILED
    return 0


def _write_attention(model: Any, image: str, folder: Path, per_image: bool, decode: dict[str, Any]) -> None:
    from .attention_maps import write_attention

    write_attention(model, image, folder / Path(image).stem if per_image else folder, decode)
