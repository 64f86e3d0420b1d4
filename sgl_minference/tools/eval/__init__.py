"""Accuracy evaluation: RULER-style synthetic tasks (``tasks``), their scoring (``scoring``) and the dense vs
sparse SGLang runner (``python -m sgl_minference.eval``)."""
