"""Offline tools, apart from the serving core: the pattern search (``python -m sgl_minference.tools.search``),
the accuracy eval (``python -m sgl_minference.tools.eval``), GGUF loading (``python -m
sgl_minference.tools.gguf_loader``) and the synthetic prompt generators both use (``prompts``, also the
multi-turn benchmark's).

Tools import the core (config, layout, kernels, patterns, registry); nothing in the core imports a tool
(``tests/test_layering.py``). No import here: ``prompts`` must load without torch.
"""
