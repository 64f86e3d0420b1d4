"""Markdown tables for BENCHMARKS.md from the results files.

    python -m benchmarks.report --kernel benchmarks/results/kernel.json --e2e benchmarks/results/e2e.json \
        --out BENCHMARKS.md

Each kind of result fills one section of the document, delimited by HTML comments
(``<!-- benchmarks:kernel:begin -->`` ... ``<!-- benchmarks:kernel:end -->``): a section is replaced when
present and appended otherwise, so prose around it survives regeneration. Every table's caption names
the device, date and command of the runs its numbers come from. Cells of failed cases show the status.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from benchmarks.common import latest_records, load_results
from benchmarks.plot import DENSE_BACKENDS, best_dense, geometry_name, variant

DENSE_COLUMNS = (("fa3", "FA3"), ("sdpa_cudnn", "SDPA cuDNN"), ("sdpa_flash", "SDPA flash"),
                 ("flashinfer", "FlashInfer"), ("ours", "ours (dense layout)"))


def marker(name: str, edge: str) -> str:
    return f"<!-- benchmarks:{name}:{edge} -->"


def update_section(doc: str, name: str, body: str) -> str:
    """``doc`` with the section ``name`` replaced by ``body`` (appended at the end when absent)."""
    begin, end = marker(name, "begin"), marker(name, "end")
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    return (doc.rstrip() + "\n\n" if doc.strip() else "") + block + "\n"


def provenance(results: dict, recs: list) -> str:
    """Caption lines: device, date and command of each run that contributed ``recs``."""
    lines = []
    for i in sorted({r.run for r in recs}):
        run = results["runs"][i]
        v = run["versions"]
        libs = ", ".join(f"{k} {v[k]}" for k in sorted(v) if v[k])
        lines.append(f"- {run['device']}, {run['date']}: `{run['command']}` ({libs})")
    return "\n".join(lines)


def ms(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def cell(rec, text: str) -> str:
    return text if rec.status == "ok" else rec.status


def kernel_section(results: dict) -> str:
    """One dense and one sparse table per (head_dim, geometry)."""
    recs = latest_records(results)
    groups = defaultdict(list)
    for r in recs:
        groups[(r.head_dim, r.seq_q == r.seq_k, r.seq_q if r.seq_q != r.seq_k else 0)].append(r)
    out = ["## Kernel-level prefill attention", ""]
    for (d, _, _), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1], kv[0][2])):
        geometry = geometry_name(rs[0].seq_q, rs[0].seq_k)
        heads = f"{rs[0].num_q_heads} query / {rs[0].num_kv_heads} KV heads, {rs[0].dtype}"
        out += [f"### head_dim {d}, {geometry} ({heads})", "", provenance(results, rs), ""]
        by = {(r.method, r.pattern, r.seq_k): r for r in rs}
        lengths = sorted({r.seq_k for r in rs})
        present = [(m, name) for m, name in DENSE_COLUMNS if any(r.method == m and r.pattern == "dense" for r in rs)]
        if present:
            out += ["Dense: attention ms (effective TFLOP/s).", "",
                    "| Sk | " + " | ".join(name for _, name in present) + " |",
                    "|---:|" + "---:|" * len(present)]
            for n in lengths:
                cells = []
                for m, _ in present:
                    r = by.get((m, "dense", n))
                    cells.append("" if r is None else cell(r, f"{ms(r.attn_ms)} ({r.tflops:.0f})"))
                out.append(f"| {n} | " + " | ".join(cells) + " |")
            out.append("")
        sparse = sorted((r for r in rs if r.pattern != "dense"), key=lambda r: (r.seq_k, r.pattern, r.method))
        if sparse:
            out += ["Sparse: index building and attention ms, density vs causal, effective TFLOP/s on the "
                    "attended pairs, speedup over FA3 (with index building), peak memory of one attention call.",
                    "", "| Sk | pattern | method | index ms | attention ms | density | TFLOP/s | speedup vs FA3 "
                    "| peak MiB | note |", "|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
            for r in sparse:
                if r.status != "ok":
                    out.append(f"| {r.seq_k} | {r.pattern} | {r.method} | {r.status} | | | | | | {r.reason[:80]} |")
                    continue
                fa3 = by.get(("fa3", "dense", r.seq_k))
                total = r.attn_ms + (r.index_ms or 0.0)
                speedup = f"{fa3.attn_ms / total:.2f}x" if fa3 is not None and fa3.status == "ok" else ""
                check = r.params.get("check")
                note = f"max diff vs {check['against']} {check['max_abs_diff']:.3g}" if check else ""
                out.append(f"| {r.seq_k} | {r.pattern} | {r.method} | {ms(r.index_ms)} | {ms(r.attn_ms)} | "
                           f"{r.density:.3f} | {r.tflops:.0f} | {speedup} | {r.peak_mib:.0f} | {note} |")
            out.append("")
    return "\n".join(out)


def _prompt(lens: tuple[int, ...]) -> str:
    return " + ".join(f"{lens.count(n)} x {n}" for n in sorted(set(lens), reverse=True)) if len(lens) > 1 \
        else str(lens[0])


def _chunk_caption(rs: list) -> str:
    """Which ``chunked_prefill_size`` each backend ran with, as SGLang resolved it."""
    seen = sorted({(variant(r, chunk=False), r.params.get("chunked_prefill_size")) for r in rs if r.params})
    return "chunked_prefill_size as resolved: " + ", ".join(f"{v} {c}" for v, c in seen) if seen else ""


def e2e_section(results: dict, dense: tuple[str, ...] = DENSE_BACKENDS) -> str:
    """Per model and requested chunk size: TTFT per variant, speedup over the faster dense backend, memory
    high-water mark; then, per model, what the sparse path did in each row that recorded it."""
    recs = latest_records(results)
    out = ["## End-to-end time to first token", ""]
    for model in sorted({r.model for r in recs}):
        for chunk in sorted({r.chunked_prefill_size for r in recs if r.model == model}, key=lambda c: c or 0):
            rs = [r for r in recs if r.model == model and r.chunked_prefill_size == chunk]
            out += _ttft_table(results, rs, model, chunk, dense)
        out += _sparse_table([r for r in recs if r.model == model], dense)
    return "\n".join(out)


def _ttft_table(results: dict, rs: list, model: str, chunk: int | None, dense: tuple[str, ...]) -> list[str]:
    is_dense = {variant(r, chunk=False): r.backend in dense for r in rs}
    names = sorted(is_dense, key=lambda v: (not is_dense[v], v))
    sparse = [v for v in names if not is_dense[v]]
    by = {(variant(r, chunk=False), r.scenario, tuple(r.input_lens)): r for r in rs}
    base = best_dense(rs, dense)
    cases = sorted({(r.scenario, tuple(r.input_lens)) for r in rs}, key=lambda c: (c[0] != "single", sum(c[1])))
    title = f"### {model}" + ("" if chunk is None else f", chunked_prefill_size {chunk}")
    out = [title, "", provenance(results, rs), "", _chunk_caption(rs), "",
           "TTFT ms (mixed: until the batch's last first token); speedup over the faster dense backend; "
           "device memory in use at the case's peak minus idle, MiB.", "",
           "| scenario | prompt tokens | " + " | ".join(f"{v} ms" for v in names) + " | "
           + " | ".join(f"{v} speedup" for v in sparse) + " | " + " | ".join(f"{v} mem" for v in names) + " |",
           "|---|---:|" + "---:|" * (2 * len(names) + len(sparse))]
    for scenario, lens in cases:
        row = [by.get((v, scenario, lens)) for v in names]
        best = base.get((model, scenario, lens, chunk))
        times = ["" if r is None else cell(r, ms(r.ttft_ms)) for r in row]
        speedups = []
        for v in sparse:
            r = by.get((v, scenario, lens))
            ok = r is not None and r.status == "ok" and best is not None
            speedups.append(f"{best / r.ttft_ms:.2f}x" if ok else "")
        mem = ["" if r is None or r.gpu_used_peak_mib is None or r.gpu_used_base_mib is None
               else f"{r.gpu_used_peak_mib - r.gpu_used_base_mib:.0f}" for r in row]
        out.append(f"| {scenario} | {_prompt(lens)} | " + " | ".join(times + speedups + mem) + " |")
    failed = [r for r in rs if r.status != "ok"]
    if failed:
        out += ["", "Failures:"] + [f"- {variant(r, chunk=False)} {r.scenario} {r.input_lens}: {r.status}: {r.reason}"
                                    for r in failed]
    out.append("")
    return out


def _sparse_table(rs: list, dense: tuple[str, ...]) -> list[str]:
    """One row per sparse-backend record with ``sparse_stats``: what the sparse path did, from inside the run."""
    rows = sorted((r for r in rs if r.status == "ok" and r.sparse_stats.get("batches")),
                  key=lambda r: (r.scenario != "single", sum(r.input_lens), r.chunked_prefill_size or 0,
                                 r.structure))
    if not rows:
        return []
    base = best_dense(rs, dense)
    peak = {(r.scenario, tuple(r.input_lens), r.chunked_prefill_size): r.gpu_used_peak_mib
            for r in rs if r.backend == "fa3" and r.status == "ok" and r.gpu_used_peak_mib}
    out = ["Sparse path, recorded inside each run (`SGL_MINFERENCE_STATS`, median repetition): attended share "
           "of the prompt's causal pairs per layer (mean, min-max over layers; chunks below the length gate count "
           "as dense), the same over the sparse-run chunks alone, index-building and sparse-attention ms summed "
           "over chunks and layers, their sum as a share of the TTFT, peak device memory (vs fa3, same chunk).", "",
           "| scenario | prompt | variant | TTFT ms | speedup | attended share | sparse-chunk share | index ms "
           "| attention ms | (index + attention) / TTFT | peak MiB |",
           "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        st = r.sparse_stats
        best = base.get((r.model, r.scenario, tuple(r.input_lens), r.chunked_prefill_size))
        speedup = f"{best / r.ttft_ms:.2f}x" if best else ""
        fa3 = peak.get((r.scenario, tuple(r.input_lens), r.chunked_prefill_size))
        mem = "" if r.gpu_used_peak_mib is None else f"{r.gpu_used_peak_mib:,.0f}" + (
            f" ({100 * (r.gpu_used_peak_mib / fa3 - 1):+.1f}%)" if fa3 else "")
        ratio = st.get("sparse_share_of_ttft")
        out.append(f"| {r.scenario} | {_prompt(tuple(r.input_lens))} | {variant(r)} | {ms(r.ttft_ms)} | {speedup} | "
                   f"{st['share_mean']:.3f} ({st['share_min']:.3f}-{st['share_max']:.3f}) | "
                   f"{st['sparse_chunk_share_mean']:.3f} | {ms(st['index_ms'])} | {ms(st['attn_ms'])} | "
                   f"{'' if ratio is None else f'{ratio:.2f}'} | {mem} |")
    out.append("")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel", help="kernel results JSON")
    ap.add_argument("--e2e", help="end-to-end results JSON")
    ap.add_argument("--out", default="BENCHMARKS.md", help="document to update in place")
    args = ap.parse_args(argv)
    path = Path(args.out)
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    if args.kernel:
        doc = update_section(doc, "kernel", kernel_section(load_results(args.kernel, "kernel")))
    if args.e2e:
        doc = update_section(doc, "e2e", e2e_section(load_results(args.e2e, "e2e")))
    path.write_text(doc)
    print(path)


if __name__ == "__main__":
    main()
