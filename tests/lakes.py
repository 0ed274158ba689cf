"""Test lakes written the way every job writes them: through delta-spark (the lake's one writer), on the
test session's Spark. A lake a test builds from fixed rows is written once per test session and copied
(a folder copy takes milliseconds; Delta commits on Spark take seconds)."""
from __future__ import annotations

import atexit
import hashlib
import shutil
import tempfile
from pathlib import Path
from typing import Callable

_TEMPLATES = Path(tempfile.mkdtemp(prefix="cai-test-lakes-"))
atexit.register(shutil.rmtree, _TEMPLATES, True)


def session():
    """The test process's one Spark session (the `spark` fixture's, created here if it is not yet)."""
    from cai_lib.runtime.session import get_spark
    return get_spark("local[1]", "cai-tests", delta=True)


def writer(root: Path):
    """The lake at `root` as the jobs write it (delta-spark)."""
    from cai_lib.lake.spark_delta import SparkDeltaLake
    return SparkDeltaLake(session(), root)


def key_of(*parts) -> str:
    """A cache key for rows: arrow tables by their IPC bytes, anything else by repr."""
    import pyarrow as pa
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, pa.Table):
            sink = pa.BufferOutputStream()
            with pa.ipc.new_stream(sink, part.schema) as w:
                w.write_table(part)
            h.update(sink.getvalue().to_pybytes())
        else:
            h.update(repr(part).encode())
    return h.hexdigest()[:16]


def cached(root: Path, key: str, build: Callable[[Path], object]) -> Path:
    """`root` holding the lake `build(folder)` writes, built once per session for `key`, then copied."""
    template = _TEMPLATES / key
    if not template.exists():
        partial = _TEMPLATES / f".{key}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        build(partial)
        partial.rename(template)
    shutil.copytree(template, root, dirs_exist_ok=True)
    return root
