"""The package's own Triton-interpreter handling: the NumPy-2.4 loop-bound fix works outside pytest, and bf16
(which the interpreter computes wrongly) is refused with an error naming the argument."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import INTERPRET, make_geometry, make_qkv

from sgl_minference.kernels import interpreter, sparse_attention
from sgl_minference.kernels.estimate import lastq_scores, pool_keys
from sgl_minference.layout import KVSource
from sgl_minference.patterns import HeadSet, build_dense

REPO = Path(__file__).resolve().parents[1]
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="checks the Triton interpreter (TRITON_INTERPRET=1)")


def test_kernels_run_in_a_plain_interpreter_process(tmp_path):
    """No conftest, no pytest: a kernel whose loop bounds are loaded counts (the dense layout's block counts)
    runs and matches the reference. Without the package's fix, NumPy 2.4 stops it with "only 0-dimensional
    arrays can be converted to Python scalars"."""
    script = textwrap.dedent("""
        import torch
        from sgl_minference.kernels import interpreter, sparse_attention
        from sgl_minference.layout import BatchGeometry, KVSource
        from sgl_minference.patterns import HeadSet, build_dense
        from sgl_minference.testing import dense_attention

        assert interpreter.ACTIVE
        geom = BatchGeometry.build([70, 3], [100, 67], "cpu")
        g = torch.Generator().manual_seed(0)
        q = torch.randn(73, 2, 64, generator=g)
        k, v = torch.randn(170, 1, 64, generator=g), torch.randn(170, 1, 64, generator=g)
        kv = KVSource.packed(k, v, geom.seq_lens_k_cpu)
        heads = HeadSet.build([0, 1], num_q_heads=2, num_kv_heads=1, device="cpu")
        o, lse = sparse_attention(q, kv, build_dense(geom, heads), geom, sm_scale=0.125)
        ref_o, ref_lse = dense_attention(q, kv, geom, sm_scale=0.125)
        torch.testing.assert_close(o, ref_o, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "ok"


def test_loop_bound_fix_is_applied_once():
    from triton.runtime import interpreter as triton_interpreter

    interpreter.fix_loop_bounds()
    patched = triton_interpreter._patch_lang_tensor
    interpreter.fix_loop_bounds()
    assert patched.sgl_minference_fix and triton_interpreter._patch_lang_tensor is patched  # not wrapped twice


@needs_interpreter
def test_bf16_is_refused_naming_the_argument():
    geom = make_geometry([70], [30])
    q, k, v = make_qkv(geom, 2, 1, 64, torch.bfloat16)
    kv = KVSource.packed(k, v, geom.seq_lens_k_cpu)
    heads = HeadSet.build([0, 1], num_q_heads=2, num_kv_heads=1, device="cpu")
    with pytest.raises(ValueError, match=r"^q: bfloat16 is not supported under the Triton interpreter"):
        sparse_attention(q, kv, build_dense(geom, heads), geom, sm_scale=0.125)
    with pytest.raises(ValueError, match=r"^q: bfloat16 is not supported under the Triton interpreter"):
        lastq_scores(q, kv, geom, heads.q_head, heads.kv_head, sm_scale=0.125)


@needs_interpreter
def test_bf16_mean_pooling_is_exact_and_allowed():
    """pool_keys multiplies no matrices: the interpreter gets bf16 right there, so it is not refused."""
    geom = make_geometry([70], [30])
    _, k, v = make_qkv(geom, 2, 1, 64, torch.bfloat16)
    pooled = pool_keys(KVSource.packed(k, v, geom.seq_lens_k_cpu), geom)
    torch.testing.assert_close(pooled[0, :, 0], k[:64].float().mean(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pooled[0, :, 1], k[64:].float().mean(0), atol=1e-6, rtol=1e-6)


def test_refusal_is_off_on_gpu(monkeypatch):
    monkeypatch.setattr(interpreter, "ACTIVE", False)
    interpreter.refuse_bf16(q=torch.zeros(1, dtype=torch.bfloat16))  # compiled kernels handle bf16
