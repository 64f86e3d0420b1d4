"""Pattern builders: each turns one batch of chunks into the common ``SparseLayout``.

``build_vertical_slash`` (estimated), ``build_block_sparse`` (estimated), ``build_a_shape`` and ``build_dense``
(static); ``concat_heads`` joins the layouts of head groups that use different patterns in one layer.
"""

from .block_sparse import build_block_sparse
from .heads import HeadSet, concat_heads
from .static import build_a_shape, build_dense
from .vertical_slash import build_vertical_slash, estimate_vertical_slash

__all__ = ["HeadSet", "build_a_shape", "build_block_sparse", "build_dense", "build_vertical_slash",
           "concat_heads", "estimate_vertical_slash"]
