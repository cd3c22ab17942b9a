"""Progress bars: one per long step, on the main process only, with a rate and an ETA.

The libraries' own bars are silenced (`prep.models.quiet_libraries`); these are the only ones
a user sees. Set PREP_PROGRESS=0 to turn them off (logs keep the counts).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable


def is_main_process() -> bool:
    """Rank 0 of a launched job (or a plain process)."""
    return os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0"


def enabled() -> bool:
    return is_main_process() and os.environ.get("PREP_PROGRESS", "1") != "0"


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it", **kwargs):
    """A tqdm bar on stderr (main process only): `desc: n/total [elapsed<eta, rate]`."""
    from tqdm.auto import tqdm

    return tqdm(
        iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled(), leave=False,
        dynamic_ncols=True, mininterval=0.5, **kwargs,
    )
