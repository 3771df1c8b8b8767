"""The modules that become ONNX graphs: the encoder (+ neck), and per decoder an *init* graph (what the decoder
computes once per image) and a *step* graph (one token for every hypothesis row), with every piece of
incremental state an explicit input and output, so that the search loop outside the graph owns it.

Transformer decoders (BTTR, CoMER, HMER-MTL), N rows, t tokens read so far, S = h*w memory positions:

    init:  memory [B,h,w,d], memory_mask [B,h,w] -> cross_k.i / cross_v.i [B,H,S,hd] per layer i, cross_valid [B,S]
    step:  tokens [N], position [1], cross_valid [N,S], image_mask [N,h,w], self_pad [N,t],
           self_k.i / self_v.i [N,H,t,hd], cross_k.i / cross_v.i [N,H,S,hd]
           (+ CoMER's running coverage raw_sum.i / used_sum.i [N,H,S]; + ICAL's SCCM cache sccm_k / sccm_v [N,H',t,hd'])
        -> logits [N,V], self_pad' [N,t+1], self_k.i' / self_v.i' [N,H,t+1,hd] (+ raw_sum.i' / used_sum.i')
           (+ sccm_k' / sccm_v' [N,H',t+1,hd'])

TAMER: the step also returns ``hidden`` [N,d] (the last layer's state), and each direction's structure module is a
graph ``structure_<direction>``: hidden [N,L,d], pad [N,L] -> sim [N,L,L] (see :class:`OnnxStructureScorer` in
:mod:`.runtime`).

PosFormer's ``coverage_skip`` is inside the step graph: whether a row's attention joins the running coverage is
decided from its input token there. ICAL's output layer (``attach_output``: the fused explicit/implicit logits) is
in the step graph too, with its SCCM key/value cache as state.

ABM, one pair of graphs per branch (direction):

    init:  memory [B,D,h,w], memory_mask [B,h,w] -> keys [B,A,h,w], hidden [B,n]
    step:  tokens [N], hidden [N,n], coverage [N,h,w], memory [N,D,h,w], keys [N,A,h,w], memory_mask [N,h,w]
        -> logits [N,V], hidden' [N,n], coverage' [N,h,w]

CAN (one direction; the counting module's count vector, projected, is computed once per image by the init graph):

    init:  memory [B,D,h,w], memory_mask [B,h,w] -> keys [B,A,h,w], hidden [B,n], valid [B,h,w], count_context [B,n]
    step:  tokens [N], hidden [N,n], coverage [N,h,w], memory [N,D,h,w], keys [N,A,h,w], valid [N,h,w],
           count_context [N,n] -> logits [N,V], hidden' [N,n], coverage' [N,h,w]

Each step module runs the decoder's own layers and hooks, so the graphs compute what ``decoder.step`` does; the
only thing rewritten here is the word position lookup, which takes the position as a tensor (a Python int would be
frozen into the graph by tracing).
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn

from ..decoders.abm import ABMDecoder
from ..decoders.can import CANDecoder
from ..decoders.comer import CoMERDecoder, _IncrementalCoverage
from ..decoders.transformer import TransformerSequenceDecoder


class Encoder(nn.Module):
    """images [B,1,H,W], image_mask [B,H,W] (True = pad) -> memory, memory_mask: ``HMERModel.encode``."""

    def __init__(self, model: Any):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(images, image_mask)


class TransformerInit(nn.Module):
    """The per-image part of a transformer decoder's state: every layer's cross-attention keys and values."""

    def __init__(self, decoder: TransformerSequenceDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        flat, flat_mask = self.decoder._flatten_memory(memory, memory_mask)
        keys, values = self.decoder._cross_key_values(flat)
        return (*keys, *values, ~flat_mask)


class TransformerStep(nn.Module):
    """One incremental step of a transformer decoder (see the module docstring for the inputs and outputs)."""

    def __init__(self, decoder: TransformerSequenceDecoder):
        super().__init__()
        self.decoder = decoder
        self.num_layers = len(decoder.layers)
        self.coverage = isinstance(decoder, CoMERDecoder) and decoder.arm is not None
        # PosFormer's coverage_skip: the ids whose step's attention stays out of the running coverage
        skip = list(getattr(decoder, "_skip_ids", [])) if self.coverage else []
        self.skips = bool(skip)
        self.register_buffer("skip_ids", torch.tensor(skip or [-1]), persistent=False)
        # ICAL: the attached output layer (fusion with the SCCM) replaces proj; its key/value cache is step state
        self.output = decoder.__dict__.get("_output")
        # TAMER: the structure rescorer reads the last layer's states of teacher-forced hypotheses (the runtime steps
        # this graph over them), so the step also returns them
        self.hidden = decoder.__dict__.get("rescorer") is not None

    def forward(self, tokens: torch.Tensor, position: torch.Tensor, cross_valid: torch.Tensor,
                image_mask: torch.Tensor, self_pad: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d, n = self.decoder, self.num_layers
        extra = 6 * n if self.coverage else 4 * n
        self_k, self_v = list(caches[:n]), list(caches[n:2 * n])
        cross_k, cross_v = list(caches[2 * n:3 * n]), list(caches[3 * n:4 * n])
        x = d.embed_norm(d.word_embed(tokens[:, None]))
        x = x + d.pos_enc.pe.index_select(0, position).to(x.dtype)[None]  # WordPosEnc at a tensor position
        if isinstance(d, CoMERDecoder):
            x = d.input_norm(x)
        self_pad = torch.cat((self_pad, (tokens == d.pad_id)[:, None]), dim=1)
        hook = None
        if self.coverage:
            state = SimpleNamespace(image_mask=image_mask, row_image=torch.arange(tokens.shape[0]),
                                    raw_sum=list(caches[4 * n:5 * n]), used_sum=list(caches[5 * n:6 * n]))
            # the hook decoder.step uses, on a state holding just what it reads
            keep = (tokens[:, None] != self.skip_ids[None]).all(1).float()[:, None, None] if self.skips else None
            hook = _IncrementalCoverage(d, state, keep)  # type: ignore[arg-type]
        x, new_k, new_v = d._run_layers(x, cross_k, cross_v, (~self_pad)[:, None, None, :],
                                        cross_valid[:, None, None, :], None, hook, past_k=self_k, past_v=self_v)
        if self.output is None:
            out = [d.proj(x[:, 0]), self_pad, *new_k, *new_v]
        else:
            logits, (sccm_k, sccm_v) = self.output.step_output(x[:, 0], self_pad, (caches[extra], caches[extra + 1]))
            out = [logits, self_pad, *new_k, *new_v]
        if hook is not None:
            out += [*hook.raw_sum, *hook.used_sum]
        if self.output is not None:
            out += [sccm_k, sccm_v]
        if self.hidden:
            out.append(x[:, 0])
        return tuple(out)


class ABMInit(nn.Module):
    """One ABM branch's per-image state: the attention keys and the initial GRU state."""

    def __init__(self, decoder: ABMDecoder, direction: str):
        super().__init__()
        self.branch = decoder.branch(direction)

    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.branch.attention.keys(memory), self.branch.initial_hidden(memory, memory_mask)


class ABMStep(nn.Module):
    """One step of one ABM branch: ``ABMDecoder.step`` with the GRU state and the coverage as inputs/outputs."""

    def __init__(self, decoder: ABMDecoder, direction: str):
        super().__init__()
        self.branch = decoder.branch(direction)
        # the fused coverage kernel, built once as init_state does; as buffers it is a constant of known shape
        # (the exporter cannot convolve with a kernel computed inside the graph)
        weight, bias = self.branch.attention.coverage_kernel()
        self.register_buffer("kernel_weight", weight.detach().clone(), persistent=False)
        self.register_buffer("kernel_bias", bias.detach().clone(), persistent=False)

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor, coverage: torch.Tensor, memory: torch.Tensor,
                keys: torch.Tensor, memory_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        branch = self.branch
        embedded = branch.embedding(tokens)
        h1 = branch.gru1(hidden, branch.gru1_input(embedded))
        context, attention = branch.attention(h1, memory, keys, memory_mask, coverage,
                                              (self.kernel_weight, self.kernel_bias))
        h2 = branch.gru2(h1, context)
        return branch.output(context, h2, embedded), h2, coverage + attention


class CANInit(nn.Module):
    """CAN's per-image state: attention keys, initial GRU state, valid region and the projected count vector."""

    def __init__(self, decoder: CANDecoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        d = self.decoder
        mask = memory_mask.bool()
        valid = (~mask).to(memory.dtype)
        _, count_vector = d.counting(memory, mask)
        return d.keys(memory, valid), d.initial_hidden(memory, valid), valid, d.counting_proj(count_vector)


class CANStep(nn.Module):
    """One step of CAN's decoder: ``CANDecoder.step`` with the GRU state and the coverage as inputs/outputs."""

    def __init__(self, decoder: CANDecoder):
        super().__init__()
        self.decoder = decoder
        # the fused coverage kernel as a constant (as ABMStep's)
        self.register_buffer("kernel", decoder.attention.coverage_kernel().detach().clone(), persistent=False)

    def forward(self, tokens: torch.Tensor, hidden: torch.Tensor, coverage: torch.Tensor, memory: torch.Tensor,
                keys: torch.Tensor, valid: torch.Tensor,
                count_context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        d = self.decoder
        embedded = d.embedding(tokens)
        hidden = d.gru(embedded, hidden)
        context, attention = d.attention(hidden, memory, keys, valid, coverage, self.kernel)
        return d.output(hidden, embedded, context, count_context), hidden, coverage + attention


def transformer_names(num_layers: int, coverage: bool, output_cache: bool = False,
                      hidden: bool = False) -> dict[str, list[str]]:
    """Input/output names of the transformer graphs (the runtime feeds and reads them by name)."""
    per_layer = lambda prefix: [f"{prefix}.{i}" for i in range(num_layers)]  # noqa: E731
    sums = per_layer("raw_sum") + per_layer("used_sum") if coverage else []
    sums += ["sccm_k", "sccm_v"] if output_cache else []
    caches = per_layer("self_k") + per_layer("self_v")
    return {
        "init_in": ["memory", "memory_mask"],
        "init_out": per_layer("cross_k") + per_layer("cross_v") + ["cross_valid"],
        "step_in": ["tokens", "position", "cross_valid", "image_mask", "self_pad", *caches,
                    *per_layer("cross_k"), *per_layer("cross_v"), *sums],
        "step_out": ["logits", "self_pad.out", *[f"{c}.out" for c in caches], *[f"{s}.out" for s in sums],
                     *(["hidden"] if hidden else [])],
    }


ABM_NAMES = {"init_in": ["memory", "memory_mask"], "init_out": ["keys", "hidden"],
             "step_in": ["tokens", "hidden", "coverage", "memory", "keys", "memory_mask"],
             "step_out": ["logits", "hidden.out", "coverage.out"]}

CAN_NAMES = {"init_in": ["memory", "memory_mask"], "init_out": ["keys", "hidden", "valid", "count_context"],
             "step_in": ["tokens", "hidden", "coverage", "memory", "keys", "valid", "count_context"],
             "step_out": ["logits", "hidden.out", "coverage.out"]}
