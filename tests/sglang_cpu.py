"""Import SGLang in the CPU tests (deps: tests/requirements-sglang-cpu.txt).

``sglang.srt.utils.common`` imports ``torchvision.io`` at module level. On a CPU-only torch, torchvision's
compiled ops (built against CUDA torch) cannot load, and torchvision then fails on import while registering
fake kernels for its ``nms``/``qnms`` ops, whose schemas only the compiled library defines. Defining those two
schemas first lets torchvision import; nothing in these tests calls them.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

_TORCHVISION_SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


def _torchvision_ops_load() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # nothing to work around: the import fails (and the test skips) for another reason
    folder = spec.submodule_search_locations[0]
    library = next((f for f in os.listdir(folder) if f.startswith("_C.") and f.endswith(".so")), None)
    if library is None:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, library))
    except OSError:
        return False
    return True


def import_server_args():
    """``sglang.srt.server_args`` (skips the test when SGLang or its import deps are not installed)."""
    if not _torchvision_ops_load():
        for name, schema in _TORCHVISION_SCHEMAS.items():
            if not hasattr(torch.ops.torchvision, name):  # defined once per process
                torch.library.define(f"torchvision::{name}", schema)
    return pytest.importorskip("sglang.srt.server_args")
