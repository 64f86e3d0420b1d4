"""Importing SGLang and transformers next to a CPU-only torch (CI, the tests, the tools' CPU paths).

``sglang.srt.utils.common`` imports ``torchvision.io`` at module level, and transformers imports torchvision when
it is installed. The torchvision wheel of the package index is built against CUDA torch: next to a CPU-only torch
its compiled ops library cannot load, and torchvision then fails on import while registering fake kernels for
its ``nms`` / ``qnms`` ops, whose schemas only that library defines. :func:`allow_torchvision_import` defines the
two schemas first, so torchvision imports (its Python parts work; those two ops still fail if called, and nothing
in this package calls them). Where the library loads (any matching torch / torchvision pair) it changes nothing.
"""

from __future__ import annotations

import importlib.util
import os
import sys

TORCHVISION_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def torchvision_ops_load() -> bool:
    """Whether torchvision's compiled ops library loads into this torch (True when there is nothing to load)."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True
    folder = spec.submodule_search_locations[0]
    library = next((f for f in os.listdir(folder) if f.startswith("_C.") and f.endswith(".so")), None)
    if library is None:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, library))
    except OSError:
        return False
    return True


def allow_torchvision_import() -> None:
    """Call before importing SGLang or transformers; safe to call any number of times."""
    if "torchvision" in sys.modules:
        return  # already imported (so it worked), or not ours to fix
    import torch

    if torchvision_ops_load():
        return
    for name, schema in TORCHVISION_SCHEMAS.items():
        if not hasattr(torch.ops.torchvision, name):
            torch.library.define(f"torchvision::{name}", schema)
