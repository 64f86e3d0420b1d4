"""The header every results file of these scripts starts with, and atomic writing (no torch: the HTTP side of the
benchmarks runs without it)."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import sys
from pathlib import Path

from sgl_minference.gpu_memory import device_description

# reported name -> distribution names to try, first found wins (the names benchmarks/common.py reports)
DISTRIBUTIONS = {"torch": ("torch",), "triton": ("triton",), "sglang": ("sglang",),
                 "flashinfer": ("flashinfer-python",), "sgl_kernel": ("sglang-kernel", "sgl-kernel")}


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries a served backend depends on (read from package metadata, not by
    importing them); None for one that is not installed."""
    out = {}
    for name, dists in DISTRIBUTIONS.items():
        out[name] = None
        for dist in dists:
            try:
                out[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out


def envelope(kind: str) -> dict:
    """Device (from nvidia-smi), date, the command line, host and library versions of this process."""
    return {
        "kind": kind,
        "device": device_description(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name] + sys.orig_argv[1:]),
        "cwd": os.getcwd(),
        "host": platform.node(),
        "python": platform.python_version(),
        "versions": library_versions(),
    }


def write_json(path: str | os.PathLike, data: dict) -> None:
    """Write ``data`` so that a command killed mid-write leaves the previous file whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str) + "\n")
    os.replace(tmp, path)
