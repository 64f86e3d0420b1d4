"""Offline kernel-aware pattern search (``python -m sgl_minference.tools.search``): ``capture`` takes per-layer
queries and keys from a transformers forward, ``recall`` scores patterns (realised by
``sgl_minference.patterns.selection``) by streamed attention recall, ``candidates`` holds the candidate space and
cost model, ``searcher`` ties them into a config."""
