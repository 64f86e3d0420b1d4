"""Accuracy evaluation: scoring of the synthetic tasks (``scoring``, tasks in ``sgl_minference.tools.prompts``)
and the dense vs sparse SGLang runner (``python -m sgl_minference.tools.eval``)."""
