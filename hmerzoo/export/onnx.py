"""``hmerzoo export MODEL --format onnx --out DIR``: the model as ONNX graphs plus what a search needs around them.

DIR holds ``encoder.onnx`` (encoder + neck), the decoder's init and step graphs (:mod:`.graphs`; ABM: one pair per
branch), ``vocab.json``, ``recipe.yaml`` (the model's recipe: its ``decode:`` section and image size ranges) and
``export.json`` (which graph is which, their input/output names, the decoder's token ids and capabilities). Batch,
image size, memory size, number of hypothesis rows and decoded length are dynamic axes of every graph.
:mod:`.runtime` runs them with onnxruntime behind the decoder step interface, so ``hmerzoo.decoding``'s one search
loop drives them.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from ..decoders.abm import ABMDecoder
from ..decoders.can import CANDecoder
from ..decoders.comer import CoMERDecoder
from ..decoders.transformer import TransformerSequenceDecoder
from ..errors import HmerzooError
from .graphs import (ABM_NAMES, CAN_NAMES, ABMInit, ABMStep, CANInit, CANStep, Encoder, TransformerInit,
                     TransformerStep, transformer_names)

EXPORT_FILE = "export.json"
FORMAT_VERSION = 1
OPSET = 17


def require_onnx() -> None:
    """Fail with how to install the [onnx] extra when onnx or onnxruntime is missing."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise HmerzooError(f"ONNX export and the onnxruntime backend need {' and '.join(missing)}, which "
                           f"{'is' if len(missing) == 1 else 'are'} not installed: pip install \"hmerzoo[onnx]\" "
                           "(or pip install onnx onnxruntime)")


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            axes: dict[str, dict[int, str]]) -> None:
    # eval first: the exporter puts the module back into the mode it found it in, and a wrapper built in train mode
    # would take the model with it (BatchNorm statistics would then move on the next forward)
    module.eval()
    with warnings.catch_warnings():
        # the TorchScript-based exporter: it keeps the decoders' Python control flow out of the graph by tracing
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_axes={k: v for k, v in axes.items() if k in inputs + outputs},
                          opset_version=OPSET, dynamo=False, do_constant_folding=True)


@torch.no_grad()
def export_onnx(model: Any, out_dir: str | Path) -> Path:
    """Write the ONNX export of ``model`` (an ``HMERModel`` on any device; exported on the CPU) into ``out_dir``."""
    require_onnx()
    import yaml

    decoder = model.decoder
    if not isinstance(decoder, (TransformerSequenceDecoder, ABMDecoder, CANDecoder)):
        raise HmerzooError(f"export: the {type(decoder).__name__} decoder has no ONNX step graph (supported: "
                           "transformer (bttr, comer and the systems built on them), abm and can decoders)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    device = next(model.parameters()).device
    model.eval().cpu()
    try:
        # example inputs: two images (the second padded), so that no traced dimension is 1 or equal to another
        images = torch.rand(2, 1, 96, 176)
        image_mask = torch.zeros(2, 96, 176, dtype=torch.bool)
        image_mask[1, 64:] = True
        image_mask[1, :, 128:] = True
        images[image_mask[:, None]] = 0.0
        image_axes = {"images": {0: "batch", 2: "height", 3: "width"}, "image_mask": {0: "batch", 1: "height",
                                                                                     2: "width"}}
        _export(Encoder(model), (images, image_mask), out / "encoder.onnx", ["images", "image_mask"],
                ["memory", "memory_mask"], image_axes)
        memory, memory_mask = model.encode(images, image_mask)
        spec: dict[str, Any] = {
            "format": FORMAT_VERSION, "vocab_size": decoder.vocab_size, "sos_id": decoder.sos_id,
            "eos_id": decoder.eos_id, "pad_id": decoder.pad_id, "directions": list(decoder.directions),
            "supports_mixed_directions": bool(decoder.capabilities.supports_mixed_directions),
            "encoder": "encoder.onnx"}
        if isinstance(decoder, TransformerSequenceDecoder):
            spec.update(_export_transformer(decoder, memory, memory_mask, out))
        elif isinstance(decoder, CANDecoder):
            spec.update(_export_can(decoder, memory, memory_mask, out))
        else:
            spec.update(_export_abm(decoder, memory, memory_mask, out))
        model.vocab.save(str(out / "vocab.json"))
        (out / "recipe.yaml").write_text(yaml.safe_dump(model.recipe or {}, sort_keys=False), encoding="utf-8")
        (out / EXPORT_FILE).write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
    finally:
        model.to(device).train(was_training)
    return out


def _export_transformer(decoder: TransformerSequenceDecoder, memory: torch.Tensor, memory_mask: torch.Tensor,
                        out: Path) -> dict[str, Any]:
    layers = len(decoder.layers)
    coverage = isinstance(decoder, CoMERDecoder) and decoder.arm is not None
    output = decoder.__dict__.get("_output")  # ICAL's fused output layer, with its own cache
    rescorer = decoder.__dict__.get("rescorer")  # TAMER's structure head
    names = transformer_names(layers, coverage, output is not None, rescorer is not None)
    memory_axes = {"memory": {0: "batch", 1: "h", 2: "w"}, "memory_mask": {0: "batch", 1: "h", 2: "w"},
                   "cross_valid": {0: "batch", 1: "positions"}}
    memory_axes.update({n: {0: "batch", 2: "positions"} for n in names["init_out"] if n != "cross_valid"})
    _export(TransformerInit(decoder), (memory, memory_mask), out / "decoder_init.onnx", names["init_in"],
            names["init_out"], memory_axes)
    # example step: 3 rows reading image 0, 1, 1, with 2 tokens read already
    rows = torch.tensor([0, 1, 1])
    init = TransformerInit(decoder)(memory, memory_mask)
    cross = [t.index_select(0, rows) for t in init[:-1]]
    cross_valid = init[-1].index_select(0, rows)
    n, heads, head_dim = 3, decoder.nhead, decoder.d_model // decoder.nhead
    past = [torch.randn(n, heads, 2, head_dim) for _ in range(2 * layers)]
    sums = [torch.rand(n, heads, cross_valid.shape[1]) * cross_valid[:, None] for _ in range(2 * layers)] \
        if coverage else []
    output_spec: dict[str, Any] = {}
    if output is not None:
        attn = output.sccm.self_attn
        output_spec = {"output_heads": attn.nhead, "output_head_dim": attn.head_dim}
        sums += [torch.randn(n, attn.nhead, 2, attn.head_dim) for _ in range(2)]
    args = (torch.tensor([5, 6, 7]), torch.tensor([2]), cross_valid, memory_mask.index_select(0, rows),
            torch.zeros(n, 2, dtype=torch.bool), *past, *cross, *sums)
    axes: dict[str, dict[int, str]] = {"tokens": {0: "rows"}, "cross_valid": {0: "rows", 1: "positions"},
                                       "image_mask": {0: "rows", 1: "h", 2: "w"}, "self_pad": {0: "rows", 1: "past"},
                                       "logits": {0: "rows"}, "self_pad.out": {0: "rows", 1: "past_next"}}
    for name in names["step_in"][5:]:
        kind = name.split(".")[0]
        axes[name] = {0: "rows", 2: "past" if kind in ("self_k", "self_v", "sccm_k", "sccm_v") else "positions"}
    for name in names["step_out"][2:]:
        kind = name.split(".")[0]
        axes[name] = {0: "rows", 2: "past_next" if kind in ("self_k", "self_v", "sccm_k", "sccm_v") else "positions"}
    axes["hidden"] = {0: "rows"}
    _export(TransformerStep(decoder), args, out / "decoder_step.onnx", names["step_in"], names["step_out"], axes)
    if rescorer is not None:
        structure = {}
        hidden = torch.randn(3, 4, decoder.d_model)
        pad = torch.zeros(3, 4, dtype=torch.bool)
        pad[1, 3:] = True
        for direction in ("l2r", "r2l"):
            structure[direction] = f"structure_{direction}.onnx"
            _export(getattr(rescorer, direction), (hidden, pad), out / structure[direction], ["hidden", "pad"],
                    ["sim"], {"hidden": {0: "rows", 1: "length"}, "pad": {0: "rows", 1: "length"},
                              "sim": {0: "rows", 1: "length", 2: "length_keys"}})
        output_spec["structure"] = structure
    return {"family": "transformer", "num_layers": layers, "nhead": heads, "head_dim": head_dim,
            "coverage": coverage, "names": names, **output_spec,
            "graphs": {"init": "decoder_init.onnx", "step": "decoder_step.onnx"}}


def _export_abm(decoder: ABMDecoder, memory: torch.Tensor, memory_mask: torch.Tensor, out: Path) -> dict[str, Any]:
    graphs = {}
    memory_axes = {"memory": {0: "batch", 2: "h", 3: "w"}, "memory_mask": {0: "batch", 1: "h", 2: "w"},
                   "keys": {0: "batch", 2: "h", 3: "w"}, "hidden": {0: "batch"}}
    rows = torch.tensor([0, 1, 1])
    step_axes = {"tokens": {0: "rows"}, "hidden": {0: "rows"}, "coverage": {0: "rows", 1: "h", 2: "w"},
                 "memory": {0: "rows", 2: "h", 3: "w"}, "keys": {0: "rows", 2: "h", 3: "w"},
                 "memory_mask": {0: "rows", 1: "h", 2: "w"}, "logits": {0: "rows"}, "hidden.out": {0: "rows"},
                 "coverage.out": {0: "rows", 1: "h", 2: "w"}}
    for direction in decoder.directions:
        init_file, step_file = f"decoder_init_{direction}.onnx", f"decoder_step_{direction}.onnx"
        _export(ABMInit(decoder, direction), (memory, memory_mask), out / init_file, ABM_NAMES["init_in"],
                ABM_NAMES["init_out"], memory_axes)
        keys, hidden = ABMInit(decoder, direction)(memory, memory_mask)
        mask = memory_mask.index_select(0, rows)
        coverage = torch.rand(3, *mask.shape[1:]) * (~mask)
        args = (torch.tensor([5, 6, 7]), hidden.index_select(0, rows), coverage, memory.index_select(0, rows),
                keys.index_select(0, rows), mask)
        _export(ABMStep(decoder, direction), args, out / step_file, ABM_NAMES["step_in"], ABM_NAMES["step_out"],
                step_axes)
        graphs[direction] = {"init": init_file, "step": step_file}
    return {"family": "abm", "names": ABM_NAMES, "graphs": graphs}


def _export_can(decoder: CANDecoder, memory: torch.Tensor, memory_mask: torch.Tensor, out: Path) -> dict[str, Any]:
    image_axes = {"memory": {0: "batch", 2: "h", 3: "w"}, "memory_mask": {0: "batch", 1: "h", 2: "w"},
                  "keys": {0: "batch", 2: "h", 3: "w"}, "hidden": {0: "batch"}, "valid": {0: "batch", 1: "h", 2: "w"},
                  "count_context": {0: "batch"}}
    _export(CANInit(decoder), (memory, memory_mask), out / "decoder_init.onnx", CAN_NAMES["init_in"],
            CAN_NAMES["init_out"], image_axes)
    keys, hidden, valid, count_context = CANInit(decoder)(memory, memory_mask)
    rows = torch.tensor([0, 1, 1])
    pick = lambda t: t.index_select(0, rows)  # noqa: E731
    coverage = torch.rand(3, *valid.shape[1:]) * pick(valid)
    args = (torch.tensor([5, 6, 7]), pick(hidden), coverage, pick(memory), pick(keys), pick(valid),
            pick(count_context))
    step_axes = {"tokens": {0: "rows"}, "hidden": {0: "rows"}, "coverage": {0: "rows", 1: "h", 2: "w"},
                 "memory": {0: "rows", 2: "h", 3: "w"}, "keys": {0: "rows", 2: "h", 3: "w"},
                 "valid": {0: "rows", 1: "h", 2: "w"}, "count_context": {0: "rows"}, "logits": {0: "rows"},
                 "hidden.out": {0: "rows"}, "coverage.out": {0: "rows", 1: "h", 2: "w"}}
    _export(CANStep(decoder), args, out / "decoder_step.onnx", CAN_NAMES["step_in"], CAN_NAMES["step_out"],
            step_axes)
    return {"family": "can", "names": CAN_NAMES, "graphs": {"init": "decoder_init.onnx", "step": "decoder_step.onnx"}}
