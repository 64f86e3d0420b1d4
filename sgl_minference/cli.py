"""What the command-line tools share: a usage error is one line on stderr and exit status 2 (argparse's own
convention for bad arguments), never a traceback."""

from __future__ import annotations

import sys
from typing import NoReturn


def fail(prog: str, message: object) -> NoReturn:
    """Print ``prog: error: message`` to stderr and exit with status 2."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)
