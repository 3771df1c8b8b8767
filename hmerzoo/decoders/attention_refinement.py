"""Old home of CoMER's attention refinement, kept for imports written before it moved to
:mod:`hmerzoo.layers.attention_refinement` (and the CBAM to :mod:`hmerzoo.layers.cbam`)."""
from ..layers.attention_refinement import AttentionRefinement
from ..layers.cbam import CBAM, ChannelAttention, SpatialAttention
from ..layers.masked_batch_norm import MaskedBatchNorm, batch_norm_valid

__all__ = ["AttentionRefinement", "CBAM", "ChannelAttention", "MaskedBatchNorm", "SpatialAttention",
           "batch_norm_valid"]
