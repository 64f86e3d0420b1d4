"""Exact top-k selection kernels (radix select) against a plain sort by (-score, position)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sgl_minference.kernels import select  # noqa: E402
from sgl_minference.kernels.select import FORCED, dense_band_width, select_vertical_slash  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SENTINEL = 1 << 29


def kept_positions(row: torch.Tensor, budget: int, forced: int) -> list[int]:
    """The rule: forced valid positions first (nearer first), then by score, ties towards low positions."""
    vals = row.tolist()
    valid = [i for i, v in enumerate(vals) if v >= 0]  # NaN compares false
    score = {i: (FORCED if i < forced else vals[i]) for i in valid}
    ranked = sorted(valid, key=lambda i: (-score[i], i))
    return sorted(ranked[:min(budget, len(valid))])


def band(sk: int, width: int) -> list[int]:
    raw = [sk - 1 - 64 * t for t in range(width)]
    return [r if r > 0 else (0 if r > -64 else -1) for r in raw]


def make_scores(seq_k, heads, n, seed):
    """[2, B, H, n]: few distinct values (ties at every threshold) over many magnitudes; -1 past Sk."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 1e-30, 3e-8, 3e-8 * (1 + 2 ** -20), 0.25, 0.5, 0.5000001, 1.0, 7.0, 64.0])
    s = levels[torch.randint(0, len(levels), (2, len(seq_k), heads, n), generator=g)]
    s += (torch.rand(s.shape, generator=g) < 0.3) * torch.rand(s.shape, generator=g) * 1e-3
    for r, sk in enumerate(seq_k):
        s[:, r, :, sk:] = -1.0
    return s


@pytest.mark.parametrize("small_chunks", [False, True])
def test_select_vertical_slash_is_exact(monkeypatch, small_chunks):
    if small_chunks:  # many shares per row: the cross-share prefix of kept and tied positions
        monkeypatch.setattr(select, "MIN_CHUNK", 32)
        monkeypatch.setattr(select, "ROW_BLOCK", 32)
    seq_k, heads, n = [300, 77, 1], 3, 300
    scores = make_scores(seq_k, heads, n, seed=0)
    scores[1, 1, 2, 40] = float("nan")  # (request 1, head 2): NaN in its diagonal sums only -> dense for the head
    vertical, slash = [5, 1000, 64], [1, 40, 300]
    width_cols, width_offs = min(max(vertical), n), max(min(max(slash), n), dense_band_width(n))
    nan_count = torch.zeros(1, dtype=torch.int32, device=DEV)
    cols, offs = select_vertical_slash(
        scores.to(DEV), torch.tensor(seq_k, dtype=torch.int32, device=DEV),
        torch.tensor(vertical, dtype=torch.int32, device=DEV), torch.tensor(slash, dtype=torch.int32, device=DEV),
        width_cols=width_cols, width_offs=width_offs, forced_sink=3, forced_local=2, sentinel=SENTINEL,
        nan_count=nan_count)
    cols, offs = cols.cpu(), offs.cpu()
    assert cols.shape == (3, heads, width_cols) and offs.shape == (3, heads, width_offs)
    for r, sk in enumerate(seq_k):
        for h in range(heads):
            if (r, h) == (1, 2):
                assert cols[r, h].tolist() == [SENTINEL] * width_cols
                assert offs[r, h].tolist() == band(sk, width_offs)
                continue
            want_c = kept_positions(scores[0, r, h], vertical[h], 3)
            want_o = kept_positions(scores[1, r, h], slash[h], 2)[::-1]
            assert cols[r, h].tolist() == want_c + [SENTINEL] * (width_cols - len(want_c)), (r, h)
            assert offs[r, h].tolist() == want_o + [-1] * (width_offs - len(want_o)), (r, h)
    assert int(nan_count) == 1
