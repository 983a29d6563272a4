"""Progress bars for the long steps (loading weights, compiling), on stderr, via tqdm."""

from __future__ import annotations

import os
import sys


def progress(iterable, desc: str, total: int | None = None):
    """``iterable`` wrapped in a tqdm bar when stderr is a terminal (or NPU_GEMMA3_PROGRESS=1)."""
    show = os.environ.get("NPU_GEMMA3_PROGRESS", "1" if sys.stderr.isatty() else "0") == "1"
    if not show:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, unit="", leave=False, file=sys.stderr)
