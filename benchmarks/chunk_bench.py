"""The sparse path of one long prompt's chunked prefill, layer by layer, at the engine's shapes (no engine).

Why: an end-to-end TTFT mixes the linear layers, SGLang's scheduling, first-use compiles and the attention
path; this isolates what ``minference`` changes. For a prompt of ``--length`` tokens cut into ``--chunk``-token
chunks it runs, for every chunk whose context reaches ``min_context``, exactly what the backend runs per layer:
``layer_layout.layer_layout`` (or the synthetic structure hook) on the *paged* KV source (``req_to_token``, page size
1, the pool's slot layout) and ``sparse_attention``, against FA3 on the same chunk (the dense baseline
SGLang uses on Hopper). Per chunk it records:

* ``first_ms``: host wall time of the first call at that chunk's shape (synchronised before and after), and
  ``compiles``: Triton kernels compiled by that call (new cache entries of the package's JIT functions). A
  serving process meets each chunk shape for the first time inside a user's request, so a compile per shape
  is paid in somebody's TTFT.
* steady state (CUDA events, median of ``--reps``): ``index_ms`` (the layer's layout build), ``attn_ms`` (the
  sparse kernel), ``fa3_ms`` (dense chunk attention); with ``--launches``, ``attn_ms_by_launch`` per launch and,
  when one of them is paired, ``pair_plan_ms`` (the layout merge the paired launches' times include, alone);
  with ``--profile``, where the index time goes: ``index_kernels`` (device ms of the longest kernels),
  ``index_kernel_ms`` (all of them), ``index_launches`` and ``index_host_ms`` (the host's time to issue the build);
* what the layout did: attended and visited share of the chunk's causal pairs.

Summed over the chunks (times the model's layer count) this is the attention part of a TTFT: the sum of
``fa3_ms`` against the sum of ``index_ms + attn_ms`` bounds what an end-to-end run can show.

Data (``--data``): ``planted`` (kernel_bench's random q/k with planted heavy columns and a rotary local band),
``uniform`` (q = k = 0: every score ties, as SGLang's dummy weights make them, so ties decide the picks),
``synthetic`` (the planted data, picks replaced by the structured synthetic distribution of
``backend/synthetic.py``, as ``SGL_MINFERENCE_SYNTHETIC`` does in serving), ``fixed`` (the published fixed-index
case: the first 1000 keys and the 6096 nearest diagonals for every head, no estimation; ``index_ms`` is the
conversion into the layout alone), ``captured`` (queries and keys of a real model, ``--captured MODEL``: one
transformers forward over an eval prompt, ``--prompt TASK[@DEPTH]``, every full-attention layer's post-RoPE q/k
kept on the device; each record is one (chunk, layer), at that model's head counts and head size, with its config
from ``--config``, e.g. ``'{"config_path": "sgl_minference/configs/gemma3-270m.json"}'``; values random). The
summary sums every record: one layer per chunk for the generated data, every full-attention layer for captured.

    python -m benchmarks.chunk_bench --model llama3-8b --length 128K --chunk 8K --data planted,uniform,synthetic \
        --out benchmarks/results/chunk_h200_8b_128k.json
    python -m benchmarks.chunk_bench --data captured --captured /tmp/models/gemma3-270m --length 32512 --chunk 8K \
        --config '{"config_path": "sgl_minference/configs/gemma3-270m.json"}' --out chunk_h200_gemma3_32k.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from functools import partial

import torch

from benchmarks.common import LAUNCH_EXAMPLE, environment, launch_name, parse_launch_list, parse_lengths
from benchmarks.timing import host_ms, kernel_times, time_ms
from sgl_minference.backend import synthetic
from sgl_minference.backend.layer_layout import layer_layout
from sgl_minference.backend.planner import layer_heads, plan_batch
from sgl_minference.backend.stats import request_pairs
from sgl_minference.cli import fail
from sgl_minference.config import MInferenceConfig
from sgl_minference.kernels import sparse_attention
from sgl_minference.kernels.sparse_attention import AttentionLaunch, pair_plan
from sgl_minference.layout import KVSource, causal_pairs
from sgl_minference.patterns import HeadSet
from sgl_minference.patterns.convert import indices_to_layout

# (query heads, KV heads, head_dim, layers) of the engine's model configs (sgl_minference/models)
MODELS = {"llama3-8b": (32, 8, 128, 32), "llama3.2-1b": (32, 8, 64, 16), "tiny": (4, 1, 64, 2)}
DATA = ("planted", "uniform", "synthetic", "fixed", "captured")
PROG = "python -m benchmarks.chunk_bench"
PROFILE_TOP = 8  # kernels kept per record by --profile, longest first


def jit_cache() -> dict[str, int]:
    """Compiled variants held by each of the package's Triton JIT functions (every device), by name."""
    import triton

    from sgl_minference.kernels import estimate, materialise, select
    from sgl_minference.kernels import sparse_attention as sa_module

    sizes = {}
    for module in (estimate, materialise, select, sys.modules[sa_module.__module__]):
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.jit.JITFunction):
                sizes[name] = sum(len(entry[0]) for entry in obj.device_caches.values())
    return sizes


def parse_launches(text: str) -> list[AttentionLaunch]:
    """``--launches`` (:func:`benchmarks.common.parse_launch_list`), or a one-line error."""
    try:
        return parse_launch_list(text)
    except ValueError:
        fail(PROG, f"--launches: {text!r}, expected e.g. {LAUNCH_EXAMPLE}")


def fa3_call(q, k, v, seq_q: int, seq_k: int, sm_scale: float):
    """FA3's dense bottom-right causal chunk attention over contiguous keys, or None without FA3."""
    try:
        from sgl_kernel import flash_attn
    except ImportError:
        return None
    if not q.is_cuda or not flash_attn.is_fa3_supported():
        return None
    cu_q = torch.tensor([0, seq_q], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0, seq_k], dtype=torch.int32, device=q.device)
    return lambda: flash_attn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_seqlen_q=seq_q, max_seqlen_k=seq_k,
                                                     softmax_scale=sm_scale, causal=True)


def chunk_inputs(data: str, *, seq_q: int, seq_k: int, hq: int, hk: int, d: int, seed: int, device: str):
    """``(q [Sq, Hq, D], k [Sk, Hk, D], v)`` bf16 on ``device`` (fp16 on a CPU, for the interpreter)."""
    from benchmarks.kernel_bench import make_inputs

    inp = make_inputs(seq_q=seq_q, seq_k=seq_k, num_q_heads=hq, num_kv_heads=hk, head_dim=d, seed=seed,
                      device=device)
    q, k, v = inp.q, inp.k, inp.v
    if data == "uniform":
        q, k = torch.zeros_like(q), torch.zeros_like(k)
    if device == "cpu":
        q, k, v = q.half(), k.half(), v.half()
    return q.contiguous(), k.contiguous(), v.contiguous()


@dataclass(kw_only=True)
class Captured:
    """A real model's post-RoPE queries and keys over one prompt, per full-attention layer, on the device."""

    hq: int
    hk: int
    d: int
    num_layers: int  # the model's, full and sliding
    sm_scale: float
    q: dict[int, torch.Tensor]  # layer -> [N, Hq, D]
    k: dict[int, torch.Tensor]  # layer -> [N, Hk, D]

    def chunk(self, layer: int, seq_q: int, seq_k: int, seed: int):
        """``(q [Sq, Hq, D], k [Sk, Hk, D], v)`` of the chunk ending at ``seq_k`` (v: seeded random, same dtype)."""
        k = self.k[layer][:seq_k]
        gen = torch.Generator(device="cpu").manual_seed(seed)
        v = torch.randn(k.shape, generator=gen).to(device=k.device, dtype=k.dtype)
        return self.q[layer][seq_k - seq_q:seq_k].contiguous(), k.contiguous(), v


def capture(source: str, task: str, depth: float, length: int, seed: int, device: str) -> Captured:
    """Run ``source`` (model folder, GGUF or its package) on ``task``'s prompt of ``length`` tokens (transformers,
    SDPA; bf16 on a GPU, fp16 on a CPU for the interpreter) and keep every full-attention layer's q and k."""
    from sgl_minference.cpu_torch import allow_torchvision_import
    from sgl_minference.tools.gguf_loader import resolve_model
    from sgl_minference.tools.prompts import make_sample
    from sgl_minference.tools.search.capture import capture_qk, full_attention_layers

    allow_torchvision_import()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(source)
    cfg = AutoConfig.from_pretrained(folder).get_text_config()
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float16
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    ids = torch.tensor(make_sample(task, AutoTokenizer.from_pretrained(folder), length=length, depth=depth,
                                   seed=seed).input_ids, dtype=torch.int64)
    q, k, scale = {}, {}, []

    def keep(qk):
        if qk.softcap is not None:
            raise ValueError(f"captured: layer {qk.layer} caps its logits; the sparse kernel has no soft-cap")
        q[qk.layer], k[qk.layer] = qk.q.transpose(0, 1).contiguous(), qk.k.transpose(0, 1).contiguous()
        scale.append(qk.sm_scale)

    capture_qk(model, ids, full_attention_layers(cfg), keep)
    del model
    head = next(iter(q.values()))
    return Captured(hq=head.shape[1], hk=next(iter(k.values())).shape[1], d=head.shape[2],
                    num_layers=cfg.num_hidden_layers, sm_scale=scale[0], q=q, k=k)


def fixed_indices(config: MInferenceConfig, heads: int, seq_k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The published fixed-index case: the first ``vertical`` keys as columns and the ``slash`` nearest diagonals,
    the default budgets, every head: ``columns [1, H, V]`` ascending, ``offsets [1, H, S]`` descending (int32)."""
    vertical, slash = min(config.default.vertical, seq_k), min(config.default.slash, seq_k)
    columns = torch.arange(vertical, dtype=torch.int32, device=device).expand(1, heads, -1).contiguous()
    offsets = torch.arange(slash - 1, -1, -1, dtype=torch.int32, device=device).expand(1, heads, -1).contiguous()
    return columns, offsets


def run_chunk(args, data: str, config: MInferenceConfig, seq_q: int, seq_k: int, captured: Captured | None = None,
              layer: int = 0) -> dict:
    device = args.device
    cuda = device.startswith("cuda")
    if captured is None:
        hq, hk, d, num_layers = MODELS[args.model]
        q, k, v = chunk_inputs(data, seq_q=seq_q, seq_k=seq_k, hq=hq, hk=hk, d=d, seed=args.seed + seq_k,
                               device=device)
        sm_scale = d ** -0.5
    else:
        hq, hk, d, num_layers = captured.hq, captured.hk, captured.d, captured.num_layers
        q, k, v = captured.chunk(layer, seq_q, seq_k, seed=args.seed + seq_k)
        sm_scale = captured.sm_scale
    # The pool's slot 0 is SGLang's padding slot: the request's keys sit at slots 1 .. Sk.
    k_buffer = torch.cat([torch.zeros_like(k[:1]), k])
    v_buffer = torch.cat([torch.zeros_like(v[:1]), v])
    req_to_token = torch.arange(1, seq_k + 1, dtype=torch.int32, device=device)[None]
    heads = layer_heads(config, layer_id=layer, head_start=0, num_q_heads=hq, num_kv_heads=hk, device=device)
    all_heads = HeadSet.build(list(range(hq)), num_q_heads=hq, num_kv_heads=hk, device=device)
    plan = plan_batch(config, seq_lens_q=[seq_q], seq_lens_k=[seq_k], req_to_token=req_to_token,
                      req_pool_indices=torch.zeros(1, dtype=torch.int64, device=device), all_heads=all_heads)
    rec = {"data": data, "seq_q": seq_q, "seq_k": seq_k, "layers": num_layers, "kv": args.kv}
    if captured is not None:
        rec["layer"] = layer
    fa3 = fa3_call(q, k, v, seq_q, seq_k, sm_scale) if cuda else None
    if fa3 is not None:
        rec["fa3_ms"] = time_ms(fa3, args.reps, cuda=cuda)
    if plan is None or heads.all_dense:  # the dense backend runs the chunk (below the gates) or the layer
        rec["sparse"] = False
        return rec
    # paged: SGLang's pool read through req_to_token (what serving runs); contiguous: the same keys packed, read
    # without the table (what the paged gather costs)
    kv = plan.kv_source(k_buffer, v_buffer) if args.kv == "paged" else KVSource.packed(k, v, [seq_k])
    build = layer_layout
    if data == "synthetic":
        build = partial(synthetic.layer_layout, structure=synthetic.DEFAULT)

    if data == "fixed":
        columns, offsets = fixed_indices(config, hq, seq_k, device)

        def index():  # no estimation: the conversion of fixed indices into the layout only
            return indices_to_layout(columns, offsets, plan.geom)
    else:
        def index():
            return build(q, kv, plan, heads, config, sm_scale=sm_scale)

    before = jit_cache()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    layout = index()
    sparse_attention(q, kv, layout, plan.geom, sm_scale=sm_scale)
    if cuda:
        torch.cuda.synchronize()
    rec["first_ms"] = 1e3 * (time.perf_counter() - t)
    after = jit_cache()
    rec["compiles"] = sum(after.values()) - sum(before.values())
    rec["compiled"] = sorted(name for name in after if after[name] > before.get(name, 0))
    rec["index_ms"] = time_ms(index, args.reps, cuda=cuda)
    if args.profile and cuda:
        # where a layer's index time goes: device time per kernel and launches, against the host's time to issue
        # them (index_host_ms near index_ms with little kernel time: launch-bound, not work-bound)
        kernels, rec["index_launches"] = kernel_times(index, 2)
        rec["index_kernel_ms"] = sum(kernels.values())
        rec["index_kernels"] = dict(list(kernels.items())[:PROFILE_TOP])
        rec["index_host_ms"] = host_ms(index, args.reps)
    rec["attn_ms"] = time_ms(lambda: sparse_attention(q, kv, layout, plan.geom, sm_scale=sm_scale), args.reps,
                             cuda=cuda)
    if args.launches:
        def attend(launch):
            return lambda: sparse_attention(q, kv, layout, plan.geom, sm_scale=sm_scale, launch=launch)

        rec["attn_ms_by_launch"] = {launch_name(launch): time_ms(attend(launch), args.reps, cuda=cuda)
                                    for launch in args.launch_list}
        if any(launch.pair_blocks for launch in args.launch_list):
            # the paired launches' times include this merge of the layout (torch sorts): timed alone, it tells
            # the plan's share from the paired kernel's
            rec["pair_plan_ms"] = time_ms(lambda: pair_plan(layout, plan.geom), args.reps, cuda=cuda)
    attended, visited = request_pairs(layout, plan.geom)
    causal = causal_pairs(seq_q, seq_k, hq)
    rec |= {"sparse": True, "attended_share": int(attended.sum()) / causal, "visited_share": int(visited.sum()) / causal}
    return rec


def summarize(records: list[dict]) -> dict:
    """Per data kind: summed ms over the prompt's chunks (one layer) and the attention-only ratio vs FA3."""
    out = {}
    for data in sorted({r["data"] for r in records}):
        rows = [r for r in records if r["data"] == data]
        fa3 = sum(r.get("fa3_ms", 0.0) for r in rows)
        ours = sum(r["index_ms"] + r["attn_ms"] if r["sparse"] else r.get("fa3_ms", 0.0) for r in rows)
        out[data] = {"fa3_ms": fa3, "minference_ms": ours, "attention_ratio": fa3 / ours if ours and fa3 else None,
                     "index_ms": sum(r.get("index_ms", 0.0) for r in rows),
                     "attn_ms": sum(r.get("attn_ms", 0.0) for r in rows),
                     "first_call_extra_ms": sum(r["first_ms"] - r["index_ms"] - r["attn_ms"] for r in rows
                                                if r["sparse"]),
                     "compiles": sum(r.get("compiles", 0) for r in rows)}
        launches = sorted({name for r in rows for name in r.get("attn_ms_by_launch", {})})
        if launches:
            out[data]["attn_ms_by_launch"] = {name: sum(r["attn_ms_by_launch"][name] for r in rows if r["sparse"])
                                              for name in launches}
        if any("pair_plan_ms" in r for r in rows):
            out[data]["pair_plan_ms"] = sum(r.get("pair_plan_ms", 0.0) for r in rows)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b", choices=sorted(MODELS))
    ap.add_argument("--length", default="128K", help="prompt tokens")
    ap.add_argument("--chunk", default="8K", help="chunked_prefill_size")
    ap.add_argument("--data", default="planted,uniform,synthetic", help=f"comma list of {','.join(DATA)}")
    ap.add_argument("--min-context", type=int, default=None, help="override the default config's gate")
    ap.add_argument("--config", default="{}",
                    help='JSON object of config fields, e.g. \'{"default": {"type": "xattention", "threshold": 0.9, '
                         '"stride": 8}}\' (index time of other patterns)')
    ap.add_argument("--kv", choices=("paged", "contiguous"), default="paged", help="how the kernels read K/V")
    ap.add_argument("--captured", default=None, help="--data captured: the model (folder, GGUF or its package)")
    ap.add_argument("--prompt", default="niah_single@0.5", help="--data captured: TASK[@DEPTH] of the eval's prompts")
    ap.add_argument("--launches", default="",
                    help="also time these attention launches (e.g. 64x4x3,128x8x2h,64x8x3p; h: heads first, "
                         "p: two query blocks per program)")
    ap.add_argument("--profile", action="store_true",
                    help="per record: the index build's kernels (device ms), launch count and host issue time")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write the records and summary here (JSON)")
    args = ap.parse_args(argv)
    try:
        (length,), (chunk,) = parse_lengths(args.length), parse_lengths(args.chunk)
    except ValueError as e:
        fail(PROG, f"--length/--chunk: {e}")
    datas = [x for x in args.data.split(",") if x]
    if not datas or any(x not in DATA for x in datas):
        fail(PROG, f"--data: {args.data!r}, expected a comma list of {', '.join(DATA)}")
    if ("captured" in datas) != (args.captured is not None) or ("captured" in datas and len(datas) > 1):
        fail(PROG, "--data captured runs alone and needs --captured MODEL (and --captured needs it)")
    args.launch_list = parse_launches(args.launches)
    try:
        overrides = json.loads(args.config)
        if args.min_context is not None:
            overrides["min_context"] = args.min_context
        config = MInferenceConfig.from_overrides(overrides, source="--config")
    except (ValueError, TypeError) as e:  # JSON and config errors
        fail(PROG, f"--config: {str(e).splitlines()[0]}")
    captured = None
    if args.captured is not None:
        from sgl_minference.tools.prompts import parse_prompt

        try:
            task, depth = parse_prompt(args.prompt)
        except ValueError as e:
            fail(PROG, f"--prompt: {e}")
        try:
            captured = capture(args.captured, task, depth, length, args.seed, args.device)
        except ValueError as e:
            fail(PROG, f"--captured: {str(e).splitlines()[0]}")
    if "fixed" in datas and config.default.type != "vertical_slash":
        fail(PROG, "--data fixed needs a vertical_slash default (its budgets give the fixed indices)")
    records = []
    for data in datas:
        # a prompt's chunks: `chunk` tokens each, the last one what is left
        for end in [*range(chunk, length, chunk), length]:
            for layer in (sorted(captured.q) if captured else [0]):
                rec = run_chunk(args, data, config, end - (end - 1) // chunk * chunk, end, captured, layer)
                records.append(rec)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items()}), flush=True)
    result = {"kind": "chunk", "command": "python -m benchmarks.chunk_bench " + " ".join(argv or sys.argv[1:]),
              "environment": environment(), "model": args.captured or args.model, "length": length, "chunk": chunk,
              "config": json.loads(args.config), **({"prompt": args.prompt} if captured else {}),
              "records": records, "summary": summarize(records)}
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
