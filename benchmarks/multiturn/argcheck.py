"""Length arguments of the HTTP side of the benchmarks (``8K,16K``, ``64K-128K``), without torch.

The client and the harness run on the host that drives a server and must not pay for (or need) torch; the
checks are the package's torch-free ``sgl_minference.checks.check``.
"""

from __future__ import annotations

from sgl_minference.checks import check


def parse_lengths(text: str) -> list[int]:
    """``"8K,16k,1M,4096"`` -> ``[8192, 16384, 1048576, 4096]`` (K = 1024)."""
    out = [parse_length(part) for part in text.split(",") if part.strip()]
    check(bool(out), "lengths", "empty list")
    return out


def parse_length(text: str) -> int:
    """``"64K"`` -> 65536, ``"4096"`` -> 4096 (K = 1024, M = 1024 * 1024)."""
    part = text.strip().upper()
    scale = {"K": 1024, "M": 1024 * 1024}.get(part[-1:], 1)
    digits = part[:-1] if scale > 1 else part
    check(digits.isdigit() and int(digits) > 0, "lengths", f"cannot read {part!r} (use e.g. 8K,16K or 8192)")
    return int(digits) * scale


def parse_range(text: str) -> tuple[int, int]:
    """``"64K-128K"`` -> ``(65536, 131072)``; a single length is a range of one."""
    low, _, high = text.partition("-")
    lo, hi = parse_length(low), parse_length(high or low)
    check(lo <= hi, "range", f"{text!r}: the low end is above the high end")
    return lo, hi
