"""What every job shares: pointer files for DVC, a printed summary, exit codes for the CLI."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from cai_lib.lake import Lake


def write_pointer(path: str | None, lake: Lake, tables: list[str], extra: dict | None = None) -> None:
    """A small, deterministic JSON (table -> Delta version, rows) that DVC tracks instead of the lake.

    Written to a temp file and renamed, so a crash never leaves half a pointer.
    """
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {"lake": str(lake.root), "tables": lake.snapshot(tables), **(extra or {})}
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    tmp.replace(out)


def report(title: str, summary: dict) -> None:
    """One summary line on stdout: `title: key=value, ...` (scripts and tests read it)."""
    print(f"{title}: " + ", ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, dict)))
    sys.stdout.flush()
