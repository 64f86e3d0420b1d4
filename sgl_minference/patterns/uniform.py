"""The four original builders in the registry's uniform signature ``(q, kv, geom, heads, *, sm_scale, est)``.

Their own signatures stay as they are: the kernel tests and the kernel benchmark call them directly. ``est`` is
the config's :class:`~sgl_minference.config.Estimation`; only vertical-slash reads it.
"""

from __future__ import annotations

from .block_sparse import build_block_sparse
from .static import build_a_shape, build_dense
from .vertical_slash import build_vertical_slash


def dense(q, kv, geom, heads, *, sm_scale, est):
    return build_dense(geom, heads)


def a_shape(q, kv, geom, heads, *, sm_scale, est):
    return build_a_shape(geom, heads)


def vertical_slash(q, kv, geom, heads, *, sm_scale, est):
    return build_vertical_slash(q, kv, geom, heads, sm_scale=sm_scale, last_q=est.last_q,
                                forced_sink=est.forced_sink, forced_local=est.forced_local)


def block_sparse(q, kv, geom, heads, *, sm_scale, est):
    return build_block_sparse(q, kv, geom, heads)
