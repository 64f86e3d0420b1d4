"""The kernels under Triton's interpreter (``TRITON_INTERPRET=1``: CPU-only machines, CI), for every caller.

* Loop bounds: the interpreter holds a loaded scalar as a size-1 array and turns it into a Python int with
  ``int()``, which NumPy deprecates for 1-d arrays and 2.4 rejects (triton-lang/triton#9171), so a kernel whose
  ``range`` bound is a loaded count fails. :func:`fix_loop_bounds` re-registers ``__index__`` to take the element;
  it runs when ``sgl_minference.kernels`` is imported with the interpreter on.
* bf16: NumPy has no bfloat16, and the interpreter computes bf16 ``tl.dot`` wrongly (measured on CPU, triton 3.6:
  a dense layout's output off by ~8e8 against the fp16-exact reference), so the wrappers whose kernels multiply
  matrices call :func:`refuse_bf16`, which raises instead of returning wrong numbers.

``ACTIVE`` is read once, on import, like ``triton.jit`` reads it when this package's kernels are defined.
"""

from __future__ import annotations

import torch
import triton

from sgl_minference.checks import check

ACTIVE = bool(triton.knobs.runtime.interpret)


def fix_loop_bounds() -> None:
    """Make interpreted kernels accept loaded scalars as ``range`` bounds under any NumPy (idempotent)."""
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "sgl_minference_fix", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor.sgl_minference_fix = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def refuse_bf16(**tensors: torch.Tensor) -> None:
    """Under the interpreter, raise a ``ValueError`` naming the first bfloat16 argument; no-op on a GPU."""
    if not ACTIVE:
        return
    for name, t in tensors.items():
        check(t.dtype != torch.bfloat16, name,
              "bfloat16 is not supported under the Triton interpreter (TRITON_INTERPRET=1 computes bf16 tl.dot "
              "wrongly): use float16 or float32 on CPU, or run on a GPU")


if ACTIVE:
    fix_loop_bounds()
