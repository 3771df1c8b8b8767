"""BTTR's decoder: one post-LN transformer decoder shared by both directions (Zhao et al., ICDAR 2021).

Faithful to the official ``bttr/model/decoder.py``: ``Embedding -> LayerNorm -> + WordPosEnc``, a stack of
torch-style ``TransformerDecoderLayer`` s (post-LN, ReLU, dropout 0.3 also on the attention weights), a causal
self-attention mask plus a key padding mask on ``<pad>`` inputs, a memory key padding mask from the image mask,
and ``Linear(d_model -> vocab)``. Training stacks the L2R and R2L rows into one 2B batch.

Everything is the shared :class:`~hmerzoo.decoders.transformer.TransformerSequenceDecoder` (incremental decoding:
cross-attention keys/values projected once per image, one self-attention key/value appended per layer and step,
where the official beam search re-decodes the whole prefix every step); BTTR adds nothing to it. Parameter names
mirror torch's ``TransformerDecoderLayer`` so official checkpoints convert by renaming prefixes.
"""
from __future__ import annotations

from ..registry import DECODERS
from .transformer import TransformerDecoderState, TransformerSequenceDecoder

BTTRDecoderState = TransformerDecoderState  # the name decoding code and tests know it by


@DECODERS.register("bttr")
class BTTRDecoder(TransformerSequenceDecoder):
    """BTTR's bidirectional transformer decoder.

    memory [B,h,w,d] (channels last, from a neck) + mask [B,h,w] (True = pad). Training rows: B L2R then B R2L.
    ``max_positions``: length of the word position table (official: 500), the longest input it can decode.
    """

    family = "bttr"
    neck_hint = "bttr_projection"
    # cross-attention is masked and nothing else reads the memory, so a memory padded beyond the image decodes
    # like the image alone
    memory_padding_invariant = True

    def __init__(self, in_channels: int, vocab_size: int, pad_id: int | None, sos_id: int, eos_id: int,
                 d_model: int = 256, nhead: int = 8, num_layers: int = 3, dim_feedforward: int = 1024,
                 dropout: float = 0.3, max_positions: int = 500):
        super().__init__(in_channels, vocab_size, pad_id, sos_id, eos_id, d_model, nhead, max_positions)
        self._add_layers(num_layers, dim_feedforward, dropout)
        self._add_output()
