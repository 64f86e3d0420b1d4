"""Speedup-versus-length figures (PNG) from the benchmark results files.

    python -m benchmarks.plot --kernel benchmarks/results/kernel.json --e2e benchmarks/results/e2e.json \
        --out-dir benchmarks/results

Kernel: for each head_dim and geometry (full prefill, or a chunk against a prefix), the speedup of each
sparse method over FlashAttention-3 on the same input: solid = index building + attention, dashed =
attention alone. End to end: TTFT speedup of each non-dense variant (backend, index structure, chunk size)
over the faster dense backend run with the same chunk size, at each length (single-request scenario), one
panel per model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import latest_records, load_results

DENSE_BACKENDS = ("fa3", "flashinfer")


def geometry_name(seq_q: int, seq_k: int) -> str:
    return "full prefill" if seq_q == seq_k else f"chunk of {seq_q} against a prefix"


def kernel_speedups(results: dict, baseline: str = "fa3") -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{panel: {series: [(seq_k, speedup), ...]}} with panels "head_dim D, <geometry>".

    Series "<method> <pattern>" divide the baseline's attention time by index + attention time; series
    "<method> <pattern> (attention only)" by the attention time alone.
    """
    recs = [r for r in latest_records(results) if r.status == "ok"]
    base = {(r.seq_q, r.seq_k, r.head_dim): r.attn_ms for r in recs if r.method == baseline and r.pattern == "dense"}
    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in sorted(recs, key=lambda r: (r.head_dim, r.seq_q != r.seq_k, r.seq_q, r.seq_k)):  # panel order
        ref = base.get((r.seq_q, r.seq_k, r.head_dim))
        if ref is None or r.pattern == "dense":
            continue
        panel = panels.setdefault(f"head_dim {r.head_dim}, {geometry_name(r.seq_q, r.seq_k)}", {})
        label = f"{r.method} {r.pattern}"
        panel.setdefault(label, []).append((r.seq_k, ref / (r.attn_ms + (r.index_ms or 0.0))))
        panel.setdefault(f"{label} (attention only)", []).append((r.seq_k, ref / r.attn_ms))
    return panels


def variant(rec, chunk: bool = True) -> str:
    """A record's engine variant for labels: the backend, its index structure (minference), the chunk size."""
    name = f"{rec.backend} {rec.structure}" if rec.structure else rec.backend
    return name if not chunk or rec.chunked_prefill_size is None else f"{name}, chunk {rec.chunked_prefill_size}"


def best_dense(recs: list, dense: tuple[str, ...] = DENSE_BACKENDS) -> dict[tuple, float]:
    """Fastest successful dense TTFT per (model, scenario, prompt lengths, requested chunk size)."""
    best: dict[tuple, float] = {}
    for r in recs:
        if r.backend in dense and r.status == "ok":
            k = (r.model, r.scenario, tuple(r.input_lens), r.chunked_prefill_size)
            best[k] = min(best.get(k, float("inf")), r.ttft_ms)
    return best


def e2e_speedups(results: dict,
                 dense: tuple[str, ...] = DENSE_BACKENDS) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{model: {variant: [(length, TTFT of the faster dense backend / TTFT of variant), ...]}}, single requests;
    the dense baseline ran with the same chunk size."""
    recs = [r for r in latest_records(results) if r.status == "ok" and r.scenario == "single"]
    base = best_dense(recs, dense)
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for r in sorted(recs, key=lambda r: r.input_lens[0]):
        ref = base.get((r.model, r.scenario, tuple(r.input_lens), r.chunked_prefill_size))
        if r.backend in dense or ref is None:
            continue
        out.setdefault(r.model, {}).setdefault(variant(r), []).append((r.input_lens[0], ref / r.ttft_ms))
    return out


def draw(panels: dict[str, dict[str, list[tuple[int, float]]]], path: Path, *, ylabel: str, title: str) -> None:
    """One subplot per panel (in the dict's order), log2 length axis labelled in K tokens, a line at speedup 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if not panels:
        raise ValueError(f"{title}: no successful records to plot")
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(6.5 * n, 4.5), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items()):
        colors = {}
        for label, points in sorted(series.items()):
            base = label.removesuffix(" (attention only)")
            color = colors.setdefault(base, f"C{len(colors) % 10}")
            xs, ys = zip(*points)
            dashed = label != base
            ax.plot(xs, ys, "--" if dashed else "-", marker="" if dashed else "o", color=color,
                    label=None if dashed else base, alpha=0.6 if dashed else 1.0)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1024:g}K"))
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.set_title(name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, wrap=True, fontsize=10)  # long titles wrap instead of running off a one-panel figure
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel", help="kernel results JSON")
    ap.add_argument("--e2e", help="end-to-end results JSON")
    ap.add_argument("--out-dir", default="benchmarks/results")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    if args.kernel:
        path = out / "kernel_speedup.png"
        draw(kernel_speedups(load_results(args.kernel, "kernel")), path, ylabel="speedup over FA3",
             title="Sparse prefill attention vs FlashAttention-3 (solid: with index building; dashed: attention only)")
        print(path)
    if args.e2e:
        path = out / "e2e_ttft_speedup.png"
        draw(e2e_speedups(load_results(args.e2e, "e2e")), path, ylabel="TTFT speedup over faster dense backend",
             title="End-to-end time to first token")
        print(path)


if __name__ == "__main__":
    main()
