"""Building blocks shared by the encoders, necks, decoders and heads; none of them is registered as a component.

- ``dropout``: :class:`UniformMaskDropout` (``nn.Dropout``'s distribution, cheaper on CPU);
- ``posenc``: the sinusoidal image (2-D) and word (1-D) position encodings of the BTTR family;
- ``attention``: :class:`MultiheadAttention` with torch's parameter layout, split into projection and attention;
- ``memory_layout``: :class:`RowLayout` / :class:`CrossMemory`, how many hypothesis rows share one image's
  cross-attention keys/values;
- ``transformer``: the post-LN :class:`TransformerDecoderLayer` with its cross-attention hook;
- ``masked_batch_norm``, ``cbam``, ``attention_refinement``: CoMER's ARM and HMER-MTL's CBAM inside it;
- ``attention_aggregation``: ABM's coverage attention (AAM).

Nothing here imports anything of hmerzoo outside this package.
"""
from .attention import MultiheadAttention
from .attention_aggregation import AttentionAggregation
from .attention_refinement import AttentionRefinement
from .cbam import CBAM
from .dropout import UniformMaskDropout
from .masked_batch_norm import MaskedBatchNorm, batch_norm_valid
from .memory_layout import CrossMemory, RowLayout
from .posenc import ImagePositionEncoding, WordPosEnc, image_position_encoding, word_position_table
from .transformer import CrossAttention, TransformerDecoderLayer

__all__ = ["AttentionAggregation", "AttentionRefinement", "CBAM", "CrossAttention", "CrossMemory",
           "ImagePositionEncoding", "MaskedBatchNorm", "MultiheadAttention", "RowLayout", "TransformerDecoderLayer",
           "UniformMaskDropout", "WordPosEnc", "batch_norm_valid", "image_position_encoding", "word_position_table"]
