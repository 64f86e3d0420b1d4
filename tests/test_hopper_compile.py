"""Every Triton kernel compiles for Hopper (sm_90), on any machine: catches what the interpreter lets through.

The interpreter runs kernels as Python, so it accepts code the compiler rejects (e.g. a plain Python global
read inside a kernel). Compiling to a cubin for an H100 target needs no GPU, only Triton's CUDA backend; it runs
in a child process without ``TRITON_INTERPRET`` (under the interpreter ``@triton.jit`` yields no compilable
functions). Argument types follow the kernels' naming convention: capitalised names are pointers, lower-case
ones scalars.
"""

import importlib
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
H100_SHARED_BYTES = 232448  # per-block shared memory limit Triton checks at launch on an H100
FLOAT_POINTERS = {"Lse", "MaxOut", "SumOut", "MaxIn", "SumIn", "ColOut", "DiagOut", "Out", "Scores"}


def signature(fn, constexprs: dict, dtype: str) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("Q", "K", "V", "O"):
            sig[name] = f"*{dtype}"
        elif name in ("KDesc", "VDesc"):  # host tensor descriptors of K / V, block [64, head_dim]
            sig[name] = f"tensordesc<{dtype}[64,{constexprs['BLOCK_D']}]>"
        elif name in FLOAT_POINTERS:
            sig[name] = "*fp32"
        elif name == "Cover":
            sig[name] = "*i8"
        elif name == "PoolIdx":
            sig[name] = "*i64"  # SGLang's req_pool_indices are int64
        elif name[0].isupper():
            sig[name] = "*i32"
        else:
            sig[name] = "fp32" if name == "qk_scale" else "i32"
    return sig


def kernel(module: str, name: str):
    return getattr(importlib.import_module(f"sgl_minference.kernels.{module}"), name)


def _attention_case(d: int, paged: bool, launch=None):
    import torch

    from sgl_minference.kernels.sparse_attention import AttentionLaunch, attention_launch, key_paths

    launch = AttentionLaunch(*launch) if launch else attention_launch(d, torch.bfloat16)
    name, block_m = ("_paired_attention_fwd", 128) if launch.pair_blocks else ("_sparse_attention_fwd", 64)
    runs = {}
    if not launch.pair_blocks:  # a paged source comes with its pool runs, as the planner gives it
        runs = key_paths(launch, paged=paged, has_runs=paged)
        runs |= {} if runs["TMA"] else dict(KDesc=None, VDesc=None)
    return ("sparse_attention", name, dict(BLOCK_M=block_m, BLOCK_N=launch.block_n, BLOCK_D=d, PAGED=paged,
                                           HEADS_FIRST=launch.heads_first, **runs), launch.num_warps,
            launch.num_stages)


def _estimate_case(name: str, d: int, paged: bool):
    from sgl_minference.kernels.estimate import SPLIT_CHUNK, lastq_launch

    launch = lastq_launch(8, 32, d)  # Llama-3 GQA: the largest stacks the product launches at this head_dim
    if name == "_lastq_lse_kernel":
        return ("estimate", name, dict(PAGED=paged, HEADS=launch.lse_heads, BLOCK=64, HEAD_DIM=d),
                launch.lse_warps, launch.num_stages)
    return ("estimate", name, dict(PAGED=paged, HEADS=launch.scores_heads, BLOCK=64, HEAD_DIM=d,
                                   SPLIT_CHUNK=SPLIT_CHUNK), launch.scores_warps, launch.num_stages)


# The launch configurations the product uses (num_warps / num_stages / heads come from the product's own choices).
CASES = [_attention_case(d, paged) for d in (64, 128, 256) for paged in (False, True)] + [
    # pool runs (the candidate launch, sharing the table's code path and shared memory) at every head_dim
    _attention_case(d, True, (64, 4, 2 if d == 256 else 3)) for d in (64, 128, 256)
] + [
    # two layout ranges per key tile (the benchmark's launch sweep), with pool runs
    _attention_case(d, True, (128, warps, stages)) for d in (64, 128) for warps in (4, 8) for stages in (2, 3)
] + [
    # full tiles of packed keys by TMA (the candidate launch `kernel_bench --launch 64x4x3d` measures)
    _attention_case(d, False, (64, 4, 2 if d == 256 else 3, False, False, True, True)) for d in (64, 128, 256)
] + [
    # two query blocks per program (8 warps: two warpgroups), the candidate launch the H200 measures
    _attention_case(d, paged, (64, 8, 2 if d == 256 else 3, False, True)) for d in (64, 128, 256)
    for paged in (False, True)
] + [
    _estimate_case(name, d, paged)
    for name in ("_lastq_lse_kernel", "_lastq_scores_kernel") for d in (64, 128, 256) for paged in (False, True)
] + [
    ("estimate", "_lastq_scores_kernel", dict(PAGED=False, HEADS=1, BLOCK=64, HEAD_DIM=128, SPLIT_CHUNK=16), 4, 3),
    ("estimate", "_head_slots_kernel", dict(HEADS=4, HS_P=32), 4, 3),
    ("estimate", "_pool_keys_kernel", dict(PAGED=True, BLOCK_N=64, HEAD_DIM=128), 4, 3),
    ("materialise", "_relative_kernel", dict(BLOCK=64, CH=256), 8, 3),
    ("materialise", "_materialise_kernel", dict(BLOCK=64, CHUNK=256, LOG=16), 4, 3),
] + [("select", "_vs_hist_kernel", dict(LEVEL=level, BLOCK=4096), 8, 3) for level in range(4)] + [
    ("select", "_vs_count_kernel", dict(BLOCK=4096), 8, 3),
    ("select", "_block_select_kernel", dict(BLOCK=64, CHUNK=2048), 4, 3),
    ("estimate", "_pool_queries_kernel", dict(BLOCK_M=64, HEAD_DIM=128), 4, 3),
    ("select", "_vs_write_kernel", dict(COUNT_NAN=True, BLOCK=4096, SHARES_P=512), 8, 3),
]


def compile_case(index: int) -> None:
    """Child process: compile ``CASES[index]`` for Hopper (raises on a compile error)."""
    module, name, constexprs, num_warps, num_stages = CASES[index]
    fn = kernel(module, name)
    sig = signature(fn, constexprs, "bf16")
    # At launch Triton specialises 16-byte-aligned pointers and integers divisible by 16 (strides in practice);
    # the same hints here give the same software pipelining, hence the same shared-memory size (checked below).
    aligned = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
               if sig[arg].startswith("*") or (sig[arg] == "i32" and arg.startswith("stride"))}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned)
    compiled = triton.compile(src, target=HOPPER, options={"num_warps": num_warps, "num_stages": num_stages})
    assert compiled.asm["cubin"], "no machine code produced"
    # Shared memory is only checked at launch: catch a configuration an H100 would refuse (OutOfResources).
    assert compiled.metadata.shared <= H100_SHARED_BYTES, \
        f"needs {compiled.metadata.shared} bytes of shared memory, the H100 has {H100_SHARED_BYTES}"


@pytest.fixture(scope="module")
def results() -> dict:
    """Compile every case in one child process; per case ``"ok"`` or the error's last lines."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys, traceback; sys.path.insert(0, 'tests'); import test_hopper_compile as t\n"
            "out = {}\n"
            "for i in range(len(t.CASES)):\n"
            "    try:\n        t.compile_case(i); out[i] = 'ok'\n"
            "    except Exception:\n        out[i] = traceback.format_exc()[-1500:]\n"
            "print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {int(k): v for k, v in json.loads(proc.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.parametrize("index", range(len(CASES)),
                         ids=[f"{c[1]}-{'-'.join(f'{k}{v}' for k, v in c[2].items())}" for c in CASES])
def test_kernel_compiles_for_hopper(results, index):
    assert results[index] == "ok", results[index]
