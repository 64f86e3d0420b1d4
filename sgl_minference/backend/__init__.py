"""The SGLang ``minference`` attention backend: per-batch planning (:mod:`.planner`), per-layer layouts
(:mod:`.layer_layout`) and the backend class (:mod:`.attn_backend`, which subclasses SGLang's
``AttentionBackend``, so importing it imports SGLang). Importing this package imports no SGLang."""
