"""Argument checks that need no torch: the project's one ``ValueError("<argument>: <problem>")`` convention.

Kept apart from :mod:`sgl_minference.layout` (which needs torch) so that the torch-free tools (the config
reader, the eval and search drivers, the GGUF loader, the benchmarks' HTTP client) raise the same errors without
importing torch.
"""

from __future__ import annotations


def check(cond: bool, name: str, msg: str) -> None:
    """Raise a ``ValueError`` naming the offending argument when ``cond`` is false."""
    if not cond:
        raise ValueError(f"{name}: {msg}")

