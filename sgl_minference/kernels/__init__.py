"""Triton kernels of sgl-minference (all read the ``SparseLayout`` / ``KVSource`` of ``sgl_minference.layout``)."""

from sgl_minference.kernels import interpreter  # noqa: F401  (first: fixes the interpreter before any kernel runs)
from sgl_minference.kernels.sparse_attention import sparse_attention

__all__ = ["sparse_attention"]
