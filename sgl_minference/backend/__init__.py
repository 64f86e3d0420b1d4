"""The SGLang ``minference`` attention backend: per-batch planning (:mod:`.planner`) and the backend class
(:mod:`.attn_backend`). Importing this package does not import SGLang; :mod:`.attn_backend` needs it only
through the objects SGLang hands over."""
