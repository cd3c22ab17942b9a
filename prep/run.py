"""Entry point of the main job: `accelerate launch prep/run.py ...` or `python prep/run.py ...`.

Same flags as `prep run`. Works as a script (no package context) and as a module.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (accelerate launch prep/run.py): make the `prep` package importable.
    # Replace the script's own folder (sys.path[0]) so its modules cannot shadow others.
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from prep.cli import main  # noqa: E402


def run_main(argv: list[str] | None = None) -> int:
    """`prep run` with `argv`."""
    return main(["run", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(run_main())
