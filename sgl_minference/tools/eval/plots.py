"""Needle-in-a-haystack heatmap: accuracy per prompt length x needle depth, one panel per mode, side by side."""

from __future__ import annotations

import os

from ...checks import check


def niah_heatmap(niah: dict, path: str | os.PathLike, *, title: str = "") -> None:
    """Write a PNG of ``niah[mode][length][depth] -> accuracy`` (``evaluate()``'s ``"niah"`` table).

    Rows are lengths (ascending), columns depths (0 = needle at the start); every mode gets a panel on the same
    0..1 colour scale, missing cells blank.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    modes = [m for m, t in niah.items() if t]
    check(len(modes) > 0, "niah", "no mode has any needle result")
    lengths = sorted({int(n) for m in modes for n in niah[m]})
    depths = sorted({float(d) for m in modes for per in niah[m].values() for d in per})
    fig, axes = plt.subplots(1, len(modes), figsize=(1.0 + 0.9 * len(depths) * len(modes), 1.2 + 0.5 * len(lengths)),
                             squeeze=False, constrained_layout=True)
    for ax, mode in zip(axes[0], modes):
        grid = np.full((len(lengths), len(depths)), np.nan)
        for n, per in niah[mode].items():
            for d, acc in per.items():
                grid[lengths.index(int(n)), depths.index(float(d))] = acc
        im = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        for (r, c), acc in np.ndenumerate(grid):
            if not np.isnan(acc):
                ax.text(c, r, f"{acc:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_yticks(range(len(lengths)), [f"{n // 1024}K" if n % 1024 == 0 else str(n) for n in lengths])
        ax.set_xlabel("needle depth")
        ax.set_ylabel("prompt tokens")
        ax.set_title(mode)
    fig.colorbar(im, ax=list(axes[0]), label="accuracy", shrink=0.9)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
