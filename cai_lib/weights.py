"""Model weights are read from safetensors only: unpickling a `.bin`/`.pt` file can run code."""
from __future__ import annotations

from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def assert_no_pickles(folder: Path | str) -> None:
    """Refuse a model folder holding pickled weights (searched recursively).

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "model.safetensors").write_bytes(b"")
    >>> assert_no_pickles(d)
    >>> _ = (d / "pytorch_model.bin").write_bytes(b"")
    >>> assert_no_pickles(d)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: model folder ... contains pickle files ['pytorch_model.bin']: ...
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"model folder {folder} does not exist or is not a folder")
    found = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES)
    if found:
        raise ValueError(f"model folder {folder} contains pickle files {found}: refusing to load pickle weight "
                         "files (unpickling can run arbitrary code); we load safetensors only. Convert the "
                         "weights (load once in a sandbox, then save_pretrained, which writes safetensors)")
