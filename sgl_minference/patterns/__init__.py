"""Pattern builders: each turns one batch of chunks into the common ``SparseLayout``.

``build_vertical_slash`` (estimated), ``build_block_sparse`` (estimated), ``build_a_shape`` and ``build_dense``
(static), ``build_xattention`` and ``build_flexprefill`` (adaptive budgets); ``concat_heads`` joins the layouts of
head groups that use different patterns in one layer. Which builder a head type uses: ``sgl_minference.registry``.
"""

from .block_sparse import build_block_sparse
from .flexprefill import build_flexprefill
from .heads import HeadSet, concat_heads
from .static import build_a_shape, build_dense
from .vertical_slash import build_vertical_slash, estimate_vertical_slash
from .xattention import build_xattention

__all__ = ["HeadSet", "build_a_shape", "build_block_sparse", "build_dense", "build_flexprefill",
           "build_vertical_slash", "build_xattention", "concat_heads", "estimate_vertical_slash"]
