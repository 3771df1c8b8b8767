"""The transformer decoder BTTR and CoMER share: ``Embedding -> LayerNorm -> + WordPosEnc [-> extra]``, a stack of
post-LN :class:`~hmerzoo.layers.transformer.TransformerDecoderLayer` s (causal + ``<pad>`` key mask on the inputs,
the image's padding mask on the memory), ``Linear(d_model -> vocab)``, and the incremental decoding state.

Each image's cross-attention keys/values are projected once, when decoding starts, and every hypothesis row of
that image reads them through a :class:`~hmerzoo.layers.memory_layout.RowLayout` (its queries laid out per image),
so beam search never copies them per row or per step: ``reorder_state`` moves only the per-row tensors (the
self-attention cache, the ``<pad>`` flags, a subclass's per-row state) and the row -> image index.

A subclass adds what makes it different through :meth:`TransformerSequenceDecoder._layer_hook`: an object whose
``cross_attention(i)`` replaces layer ``i``'s cross-attention and which sees each layer's extra output (CoMER's
attention refinement and its coverage state); BTTR has none.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..layers.memory_layout import CrossMemory, RowLayout, host_to_device
from ..layers.posenc import WordPosEnc
from ..layers.transformer import CrossAttention, TransformerDecoderLayer
from ..sequence import DecoderOutput, direction_tokens, sequence_log_likelihood, teacher_forcing_tensors
from .base import SequenceDecoder, length_chunks, stacked_bidirectional_forward


class LayerHook(Protocol):
    """What a subclass plugs into one pass over the layers (teacher forcing or one step)."""

    def cross_attention(self, layer: int) -> CrossAttention | None: ...

    def after_layer(self, layer: int, extra: Any) -> None: ...


@dataclass
class TransformerDecoderState:
    """Incremental-decoding state. Rows N are hypotheses (images x beams); memory rows M are the images.

    memory_k/memory_v: per layer [M,H,S,hd], projected once per image; memory_mask: [M,1,1,S]; image_mask: the
    images' padding mask as given (True = pad, e.g. [M,h,w]). cross: the part of the memory the live rows read,
    gathered again only when the set of images with live rows changes (never per row). row_image: [N] the memory
    row each row reads; layout: where each row's query sits in ``cross``'s grid. self_k/self_v: per layer
    [N,H,t,hd], one entry appended per step. self_pad: [N,t] True where the input token was ``<pad>`` (masked as a
    key, as the official code does). position: t, the next input's position. Masks built here are bool with
    True = may attend. direction: of every memory row (one string when all share it).
    cross_images: the memory rows ``cross`` holds, on the host (None: not known there). valid_positions: [M,S]
    numpy bool, the memory positions each image has (read once at the start, for compacting on the host; None
    when the decoder does not compact).
    """

    memory_k: list[torch.Tensor]
    memory_v: list[torch.Tensor]
    memory_mask: torch.Tensor
    image_mask: torch.Tensor
    cross: CrossMemory
    row_image: torch.Tensor
    layout: RowLayout
    self_k: list[torch.Tensor]
    self_v: list[torch.Tensor]
    self_pad: torch.Tensor
    position: int
    direction: str | list[str]
    output_state: Any = None  # the attached output layer's own state (attach_output), if any
    cross_images: tuple[int, ...] | None = None
    valid_positions: Any = None


class TransformerSequenceDecoder(SequenceDecoder):
    """Base of BTTR's and CoMER's decoders; memory [B,h,w,d] (channels last) + mask [B,h,w] (True = pad).

    Subclasses build their modules in the order their checkpoints list them (that order is the parameter order
    the optimizer state of saved training checkpoints follows): ``super().__init__`` (embedding, its LayerNorm,
    the word position encoding), then their own input modules, :meth:`_add_layers`, their own layer-level
    modules, :meth:`_add_output`.
    """

    family = "transformer"  # name in error messages
    neck_hint = "bttr_projection"  # a neck that projects encoder features to d_model
    # the direction only picks the start token (one set of weights), so L2R and R2L rows share a batch
    supports_mixed_directions = True
    shares_image_memory = True  # the keys/values stay per image; rows reach them through the row layout
    # may drop memory positions padded in every image a batch reads (only attention reads the positions)
    compact_memory = True
    # reorder_state regroups rows by image from the caller's host list, not the device (a subclass that overrides
    # reorder_state must accept memory_rows=None too, or set this False)
    takes_memory_rows = True
    state_class: type[TransformerDecoderState] = TransformerDecoderState
    rescorer: Any = None  # see attach_rescorer

    def __init__(self, in_channels: int, vocab_size: int, pad_id: int | None, sos_id: int, eos_id: int,
                 d_model: int, nhead: int, max_positions: int):
        super().__init__()
        family = self.family
        if in_channels != d_model:
            raise ValueError(f"{family} decoder: its memory has {in_channels} channels but d_model is {d_model}; "
                             f"use a neck that projects the encoder features to d_model (e.g. {self.neck_hint} "
                             f"with d_model: {d_model})")
        if pad_id is None:
            raise ValueError(f"{family} decoder: the vocabulary has no <pad> token; {family.upper()} pads its inputs "
                             "with <pad> and masks them, so add <pad> to vocab.specials")
        self.d_model = d_model
        self.nhead = nhead
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.sos_id = sos_id
        self.eos_id = eos_id
        self.word_embed = nn.Embedding(vocab_size, d_model)
        self.embed_norm = nn.LayerNorm(d_model)
        self.pos_enc = WordPosEnc(d_model, max_len=max_positions)

    def _add_layers(self, num_layers: int, dim_feedforward: int, dropout: float) -> None:
        self.layers = nn.ModuleList(TransformerDecoderLayer(self.d_model, self.nhead, dim_feedforward, dropout)
                                    for _ in range(num_layers))

    def _add_output(self) -> None:
        self.proj = nn.Linear(self.d_model, self.vocab_size)

    def attach_output(self, output: Any) -> None:
        """Predict with ``output``'s logits instead of ``proj``'s at inference (search, rescoring, scoring, greedy);
        the training pass keeps ``proj``'s and its hidden states, from which the owner computes its own losses.
        ``output`` (an auxiliary head, e.g. ICAL's fusion) provides ``output_logits(hidden, pad)``,
        ``init_output_state``, ``step_output`` and ``reorder_output_state``. It is held outside ``_modules``: its
        parameters belong to (and are saved by) the head that owns them."""
        self.__dict__["_output"] = output

    def attach_rescorer(self, scorer: Any) -> None:
        """A second-pass scorer of finished hypotheses that a search mode reads as ``decoder.rescorer`` (TAMER's
        structure score, ``decode.mode: tamer``); held outside ``_modules`` as in ``attach_output``."""
        self.__dict__["rescorer"] = scorer

    def _predicted(self, logits: torch.Tensor, hidden: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        output = self.__dict__.get("_output")
        return logits if output is None else output.output_logits(hidden, inputs == self.pad_id)

    # --- what subclasses change ---------------------------------------------------------------------------------
    def _embed(self, inputs: torch.Tensor, offset: int = 0) -> torch.Tensor:
        return self.pos_enc(self.embed_norm(self.word_embed(inputs)), offset)

    def _layer_hook(self, row_mask: torch.Tensor | None, state: TransformerDecoderState | None,
                    inputs: torch.Tensor | None = None) -> LayerHook | None:
        """The hook of one pass. Teacher forcing: ``row_mask`` is the image padding mask of each row ([N,h,w]),
        ``state`` None. A step: ``state`` is the state before it (``row_mask`` None: ``state.image_mask`` of
        ``state.row_image``). ``inputs``: the pass's input tokens ([N,L]; [N,1] for a step). None: plain
        cross-attention."""
        return None

    def _initial_row_state(self, num_rows: int, image_mask: torch.Tensor) -> dict[str, Any]:
        """The subclass's per-row state fields for ``num_rows`` new rows (a ``state_class`` field each)."""
        return {}

    def _step_updates(self, hook: LayerHook | None) -> dict[str, Any]:
        """The subclass's state fields after a step, from the step's hook."""
        return {}

    def _reorder_rows(self, state: TransformerDecoderState, index: torch.Tensor) -> dict[str, Any]:
        """The subclass's per-row state fields, rows picked by ``index``."""
        return {}

    # --- shared pieces ------------------------------------------------------------------------------------------
    @staticmethod
    def _flatten_memory(memory: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B,h,w,d], [B,h,w] -> [B,h*w,d], [B,h*w] (row-major, as the official encoder flattens)."""
        if memory.dim() == 4:
            memory = memory.flatten(1, 2)
            mask = mask.flatten(1)
        return memory, mask.bool()

    def _cross_key_values(self, memory: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        keys, values = [], []
        for layer in self.layers:
            k, v = layer.multihead_attn.project_key_value(memory)
            keys.append(k)
            values.append(v)
        return keys, values

    def _self_mask(self, inputs: torch.Tensor) -> torch.Tensor:
        """Causal mask plus the official key padding mask on ``<pad>`` inputs, [N,1,L,L] (True = may attend)."""
        length = inputs.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=inputs.device).tril()
        return causal[None, None] & (inputs != self.pad_id)[:, None, None, :]

    def _run_layers(self, x: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                    self_mask: torch.Tensor | None, cross_mask: torch.Tensor, layout: RowLayout | None,
                    hook: LayerHook | None, past_k: list[torch.Tensor] | None = None,
                    past_v: list[torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            x, k, v, extra = layer(x, keys[i], values[i], self_mask, cross_mask,
                                   past_k=None if past_k is None else past_k[i],
                                   past_v=None if past_v is None else past_v[i], cross_layout=layout,
                                   cross_attention=None if hook is None else hook.cross_attention(i))
            if hook is not None:
                hook.after_layer(i, extra)
            new_k.append(k)
            new_v.append(v)
        return x, new_k, new_v

    def decode(self, memory: torch.Tensor, mask: torch.Tensor, inputs: torch.Tensor, rows_per_image: int = 1,
               memory_index: torch.Tensor | Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass over given decoder inputs [N,L] (start token first, ``<pad>``-padded).

        Which image row r reads: ``memory_index[r]`` when given (rescoring many hypotheses of a few images; a host
        list is grouped per image on the host, a tensor on the device), else
        image r % B with N = rows_per_image * B (the official [L2R; R2L] stacking). Either way the memory's
        keys/values are projected once per image. Returns (logits [N,L,V], hidden [N,L,d]).
        """
        flat, flat_mask = self._flatten_memory(memory, mask)
        keys, values = self._cross_key_values(flat)
        cross_mask = (~flat_mask)[:, None, None, :]
        if memory_index is not None:
            if not isinstance(memory_index, torch.Tensor):  # a host list (takes_memory_rows): grouped on the host
                host_rows = [int(i) for i in memory_index]
                valid = (~flat_mask).cpu().numpy() if self.compact_memory else None
                return self._decode_rows(inputs, keys, values, cross_mask, mask.bool(),
                                         host_to_device(host_rows, inputs.device), host_rows, valid)
            return self._decode_rows(inputs, keys, values, cross_mask, mask.bool(), memory_index)
        row_mask = mask.bool().repeat(rows_per_image, *([1] * (mask.dim() - 1)))
        keys = [k.repeat(rows_per_image, 1, 1, 1) for k in keys]
        values = [v.repeat(rows_per_image, 1, 1, 1) for v in values]
        x, _, _ = self._run_layers(self._embed(inputs), keys, values, self._self_mask(inputs),
                                   cross_mask.repeat(rows_per_image, 1, 1, 1), None,
                                   self._layer_hook(row_mask, None, inputs))
        return self.proj(x), x

    def _decode_rows(self, inputs: torch.Tensor, memory_k: list[torch.Tensor], memory_v: list[torch.Tensor],
                     memory_mask: torch.Tensor, image_mask: torch.Tensor, memory_index: torch.Tensor,
                     host_rows: list[int] | None = None,
                     valid: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced pass where row r reads memory row ``memory_index[r]`` of projected keys/values [M,...]:
        the rows' queries are grouped per image, so the keys/values are never copied per row. ``host_rows``: the
        same index known on the host, ``valid``: the memory's valid positions [M,S] (numpy) when compacting; with
        them the grouping reads nothing from the device."""
        if host_rows is not None:
            images_list = sorted(set(host_rows))
            positions = None if valid is None else np.flatnonzero(valid[images_list].any(0)).tolist()
            cross = CrossMemory.select(memory_k, memory_v, memory_mask, host_to_device(images_list, inputs.device),
                                       compact=self.compact_memory, positions=positions,
                                       all_images=images_list == list(range(memory_mask.shape[0])))
            layout = RowLayout.of_host(host_rows, images_list, inputs.device)
        else:
            images = torch.unique(memory_index)
            cross = CrossMemory.select(memory_k, memory_v, memory_mask, images, compact=self.compact_memory)
            layout = RowLayout.of(torch.searchsorted(images, memory_index), images.numel())
        hook = self._layer_hook(image_mask.index_select(0, memory_index), None, inputs)
        x, _, _ = self._run_layers(self._embed(inputs), cross.keys, cross.values, self._self_mask(inputs),
                                   cross.mask, layout, hook)
        return self.proj(x), x

    # --- teacher forcing ----------------------------------------------------------------------------------------
    def forward(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                tokens: Sequence[Sequence[int]]) -> DecoderOutput:
        """The training pass: L2R and R2L rows of every sample in one 2B batch, sharing the image memory."""
        return stacked_bidirectional_forward(self, memory, memory_mask, tokens)

    def teacher_forced(self, memory: torch.Tensor, memory_mask: torch.Tensor, tokens: Sequence[Sequence[int]],
                       direction: str = "l2r",
                       memory_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = teacher_forcing_tensors(tokens, direction, self.sos_id, self.eos_id, self.pad_id,
                                                  memory.device)
        logits, hidden = self.decode(memory, memory_mask, inputs, memory_index=memory_index)
        return self._predicted(logits, hidden, inputs), targets

    def log_likelihood(self, memory: torch.Tensor, memory_mask: torch.Tensor, tokens: Sequence[Sequence[int]],
                       direction: str = "l2r",
                       memory_index: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        # as the base class (sequences of similar length scored together), but each image's keys/values are
        # projected once for all the passes and never copied per sequence. ``memory_index`` may also be a host
        # list (takes_memory_rows): then the grouping per image is worked out on the host
        flat, flat_mask = self._flatten_memory(memory, memory_mask)
        memory_k, memory_v = self._cross_key_values(flat)
        host_index = None
        if memory_index is None:
            host_index = list(range(len(tokens)))
        elif not isinstance(memory_index, torch.Tensor):
            host_index = [int(i) for i in memory_index]
        # one read per call instead of one per chunk: the positions each image has, for compacting on the host
        valid = (~flat_mask).cpu().numpy() if host_index is not None and self.compact_memory else None
        scores = torch.empty(len(tokens), dtype=torch.float32, device=memory.device)
        for chunk in length_chunks([len(seq) for seq in tokens]):
            inputs, targets = teacher_forcing_tensors([tokens[i] for i in chunk], direction, self.sos_id,
                                                      self.eos_id, self.pad_id, memory.device)
            if host_index is None:
                rows = host_to_device(chunk, memory.device)
                index, host_rows = memory_index.index_select(0, rows), None
            else:
                host_rows = [host_index[i] for i in chunk]
                both = host_to_device(chunk + host_rows, memory.device)
                rows, index = both[:len(chunk)], both[len(chunk):]
            logits, hidden = self._decode_rows(inputs, memory_k, memory_v, (~flat_mask)[:, None, None, :],
                                               memory_mask.bool(), index, host_rows, valid)
            scores[rows] = sequence_log_likelihood(self._predicted(logits, hidden, inputs), targets)
        return scores

    def prefix_logits(self, memory: torch.Tensor, memory_mask: torch.Tensor, inputs: torch.Tensor,
                      direction: str | Sequence[str] = "l2r",
                      memory_index: Sequence[int] | None = None) -> torch.Tensor:
        """Full pass over decoder inputs [N,t] as the official search runs it every step (benchmark mode) and as
        CoMER's rating runs it. The start token the caller put first is all the direction changes. Row i reads
        memory row i, or ``memory_index[i]`` (a host list: each image's keys/values projected once for its rows)."""
        logits, hidden = self.decode(memory, memory_mask, inputs, memory_index=memory_index)
        return self._predicted(logits, hidden, inputs)

    # --- incremental decoding -----------------------------------------------------------------------------------
    def init_state(self, memory: torch.Tensor, memory_mask: torch.Tensor,
                   direction: str | Sequence[str] = "l2r") -> TransformerDecoderState:
        """One hypothesis row per memory row. ``direction``: one for all rows, or one per memory row (the
        direction only decides the start token, which the caller feeds, so both kinds of rows can share a batch)."""
        directions = [direction] if isinstance(direction, str) else list(direction)
        for d in directions:
            direction_tokens(self.sos_id, self.eos_id, d)  # validates the direction
        if not isinstance(direction, str) and len(directions) != memory.shape[0]:
            raise ValueError(f"init_state: {len(directions)} directions for {memory.shape[0]} memory rows")
        flat, flat_mask = self._flatten_memory(memory, memory_mask)
        memory_k, memory_v = self._cross_key_values(flat)
        cross_mask = (~flat_mask)[:, None, None, :]
        n, device = memory.shape[0], memory.device
        output = self.__dict__.get("_output")
        images = torch.arange(n, device=device)
        empty = [k.new_empty(n, self.nhead, 0, self.d_model // self.nhead) for k in memory_k]
        image_mask = memory_mask.bool()
        valid = positions = None
        if self.compact_memory:
            # one read per search: which positions each image has, so regrouping rows never reads the device
            valid = (~flat_mask).cpu().numpy()
            positions = np.flatnonzero(valid.any(0)).tolist()
        return self.state_class(
            memory_k=memory_k, memory_v=memory_v, memory_mask=cross_mask, image_mask=image_mask,
            cross=CrossMemory.select(memory_k, memory_v, cross_mask, images, compact=self.compact_memory,
                                     all_images=True, positions=positions),
            row_image=images, layout=RowLayout.one_per_memory(n, device), self_k=empty, self_v=list(empty),
            self_pad=torch.zeros(n, 0, dtype=torch.bool, device=device), position=0,
            direction=direction if isinstance(direction, str) else directions, cross_images=tuple(range(n)),
            valid_positions=valid, output_state=None if output is None else output.init_output_state(n, device),
            **self._initial_row_state(n, image_mask))

    def step(self, state: TransformerDecoderState,
             last_tokens: torch.Tensor) -> tuple[torch.Tensor, TransformerDecoderState]:
        """Logits [N,V] of the next token given the previous one [N]; attends to the cached prefix only."""
        x = self._embed(last_tokens[:, None], offset=state.position)  # [N,1,d]
        self_pad = torch.cat((state.self_pad, (last_tokens == self.pad_id)[:, None]), dim=1)
        # the official key padding mask also hides <pad> inputs of a hypothesis (only if the model emits <pad>);
        # always passed: asking whether any input was <pad> would wait for the device at every step
        self_mask = (~self_pad)[:, None, None, :]
        hook = self._layer_hook(None, state, last_tokens[:, None])
        cross = state.cross
        x, new_k, new_v = self._run_layers(x, cross.keys, cross.values, self_mask, cross.mask, state.layout, hook,
                                           past_k=state.self_k, past_v=state.self_v)
        output = self.__dict__.get("_output")
        if output is None:
            logits, output_state = self.proj(x[:, 0]), None
        else:
            logits, output_state = output.step_output(x[:, 0], self_pad, state.output_state)
        state = replace(state, self_k=new_k, self_v=new_v, self_pad=self_pad, position=state.position + 1,
                        output_state=output_state, **self._step_updates(hook))
        return logits, state

    def reorder_state(self, state: TransformerDecoderState, index: torch.Tensor,
                      memory_rows: Sequence[int] | None = None) -> TransformerDecoderState:
        """Keep/duplicate rows: row i of the result is row ``index[i]`` of ``state`` (beam search bookkeeping).

        Only the per-row tensors are gathered every step; the images' cross-attention keys/values are gathered
        again only when the set of images that still have rows changes. ``memory_rows``: the memory row of every
        new row, when the caller knows it on the host (the search does): then nothing here reads the device.
        """
        def pick(t: torch.Tensor) -> torch.Tensor:
            return t.index_select(0, index)

        row_image = pick(state.row_image)
        if memory_rows is not None:
            cross, layout, known = self._regroup_on_host(state, list(memory_rows))
        else:
            images = torch.unique(row_image)  # sorted
            cross, known = state.cross, None
            if images.shape != cross.images.shape or not bool(torch.equal(images, cross.images)):
                cross = CrossMemory.select(state.memory_k, state.memory_v, state.memory_mask, images,
                                           compact=self.compact_memory)
            layout = RowLayout.of(torch.searchsorted(images, row_image), images.numel())
        return replace(state, cross=cross, row_image=row_image, layout=layout, cross_images=known,
                       self_k=[pick(t) for t in state.self_k], self_v=[pick(t) for t in state.self_v],
                       self_pad=pick(state.self_pad), **self._reorder_rows(state, index),
                       output_state=None if state.output_state is None
                       else self.__dict__["_output"].reorder_output_state(state.output_state, index))

    def _regroup_on_host(self, state: TransformerDecoderState,
                         memory_rows: list[int]) -> tuple[CrossMemory, RowLayout, tuple[int, ...]]:
        """The cross memory and row layout of rows reading ``memory_rows``, worked out on the host."""
        images = sorted(set(memory_rows))
        device = state.row_image.device
        cross = state.cross
        if tuple(images) != state.cross_images:
            positions = None
            if self.compact_memory and state.valid_positions is not None:
                positions = np.flatnonzero(state.valid_positions[images].any(0)).tolist()
            cross = CrossMemory.select(state.memory_k, state.memory_v, state.memory_mask,
                                       host_to_device(images, device), compact=self.compact_memory,
                                       all_images=images == list(range(state.memory_mask.shape[0])),
                                       positions=positions)
        return cross, RowLayout.of_host(memory_rows, images, device), tuple(images)
