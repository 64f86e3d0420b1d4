"""The PASS/FAIL lines of the reliability checks, collected for the results file as they are made."""

from __future__ import annotations

from typing import Callable

STATUSES = ("PASS", "FAIL", "INCONCLUSIVE")


class Checks:
    """Collects check results and prints each as ``STATUS name: message``.

    ``on_add`` runs after every check (the CLI writes the results file there, so a command killed at its
    device-time limit still leaves the checks it finished).
    """

    def __init__(self, on_add: Callable[[], None] | None = None) -> None:
        self.items: list[dict] = []
        self._on_add = on_add

    def add(self, name: str, status: str, message: str, **details) -> None:
        if status not in STATUSES:
            raise ValueError(f"status: {status!r} is not one of {STATUSES}")
        print(f"{status} {name}: {message}", flush=True)
        self.items.append({"name": name, "status": status, "message": message, **details})
        if self._on_add is not None:
            self._on_add()

    @property
    def failed(self) -> bool:
        return any(c["status"] == "FAIL" for c in self.items)
