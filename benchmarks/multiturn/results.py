"""The header every results file of these scripts starts with, and atomic writing."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

from benchmarks.common import library_versions
from benchmarks.multiturn.gpu_memory import device_description


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
