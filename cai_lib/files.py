"""All-or-nothing writes: a crash never leaves half a JSON file or half a model folder.

    write_json("metrics/train_sl.json", {"loss": 0.5})          # temp file, then rename
    with atomic_folder("models/sl") as tmp:                      # temp folder, then rename
        model.save_pretrained(tmp)

Both write next to the target (same file system, so the rename is atomic) and replace an
earlier target only once the new one is complete.
"""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Iterator


def write_json(path: str | Path | None, body: dict) -> None:
    """Write `body` as indented, key-sorted JSON (None = do nothing: the file was not asked for).

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "sub" / "m.json"
    >>> write_json(p, {"b": 1, "a": 0.5}); p.read_text()
    '{\\n  "a": 0.5,\\n  "b": 1\\n}\\n'
    >>> sorted(x.name for x in p.parent.iterdir())    # no temp file left behind
    ['m.json']
    """
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(out)


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a fresh sibling temp folder; on success it replaces `path`, on error it is removed.

    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "model"
    >>> with atomic_folder(out) as tmp:
    ...     _ = (tmp / "w.safetensors").write_bytes(b"1")
    >>> [p.name for p in out.iterdir()]
    ['w.safetensors']
    >>> try:
    ...     with atomic_folder(out) as tmp:
    ...         raise RuntimeError("crash mid-write")
    ... except RuntimeError:
    ...     pass
    >>> [p.name for p in out.iterdir()], tmp.exists()   # the earlier folder stays whole
    (['w.safetensors'], False)
    """
    out = Path(path).resolve()
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)   # a crashed earlier run's leftovers
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)          # a half-written folder never looks ready
