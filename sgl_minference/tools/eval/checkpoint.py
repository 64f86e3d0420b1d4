"""Resumable evaluation: each mode's outputs, appended per generate batch to a JSON-lines file beside the results.

GPU time comes in short calls, so a long eval has to survive being cut off: with ``--resume`` a prompt whose output
is already in the file (same mode, same settings fingerprint, same prompt) is not generated again, and a mode with
nothing left starts no engine. One line per sample: ``{"mode", "fingerprint", "key", "output"}``; the key hashes
the sample's task, length, depth, seed and token ids, the fingerprint the settings that decide the output (model,
engine arguments, sparse config, top-k).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..prompts import Sample


def digest(value) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def sample_key(sample: Sample) -> str:
    return digest([sample.task, sample.length, sample.depth, sample.seed, sample.input_ids])


class OutputStore:
    """The outputs file of one results file. ``resume=False`` starts it afresh (earlier lines are dropped)."""

    def __init__(self, path: str | Path, fingerprints: Mapping[str, str], *, resume: bool):
        self.path = Path(path)
        self.fingerprints = dict(fingerprints)  # mode -> fingerprint of its settings
        self._done: dict[str, dict[str, dict]] = {mode: {} for mode in self.fingerprints}
        kept = []
        if resume and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut off when the run was killed
                    continue
                kept.append(line)
                mode = rec.get("mode")
                if mode in self.fingerprints and rec.get("fingerprint") == self.fingerprints[mode]:
                    self._done[mode][rec["key"]] = rec["output"]
        # Rewritten whole lines only (other settings' lines stay), so appends never follow a cut-off line.
        self.path.write_text("".join(line + "\n" for line in kept))

    def missing(self, mode: str, samples: Sequence[Sample]) -> list[Sample]:
        """The samples of ``mode`` without a stored output, in order."""
        return [s for s in samples if sample_key(s) not in self._done[mode]]

    def add(self, mode: str, samples: Sequence[Sample], outputs: Sequence[dict]) -> None:
        """Store (and append to the file) one batch of ``mode``'s outputs."""
        with open(self.path, "a") as f:
            for s, out in zip(samples, outputs, strict=True):
                key = sample_key(s)
                self._done[mode][key] = out
                f.write(json.dumps({"mode": mode, "fingerprint": self.fingerprints[mode], "key": key,
                                    "output": out}) + "\n")

    def outputs(self, mode: str, samples: Sequence[Sample]) -> list[dict]:
        """``mode``'s output of every sample, in order (all must be stored)."""
        return [self._done[mode][sample_key(s)] for s in samples]


__all__ = ["OutputStore", "digest", "sample_key"]
