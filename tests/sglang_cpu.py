"""Import SGLang in the CPU tests (deps: tests/requirements-sglang-cpu.txt).

SGLang imports torchvision, whose CUDA-built ops cannot load next to the CPU-only torch of these tests; the
package's own workaround (``sgl_minference.cpu_torch``) lets it import, as it does for the tools.
"""

from __future__ import annotations

import pytest

from sgl_minference.cpu_torch import allow_torchvision_import


def import_server_args():
    """``sglang.srt.server_args`` (skips the test when SGLang or its import deps are not installed)."""
    allow_torchvision_import()
    return pytest.importorskip("sglang.srt.server_args")
