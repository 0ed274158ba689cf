"""How weights are loaded: safetensors only (unpickling a `.bin`/`.pt` file can run code), and dtypes by name.

Every path that loads weights (generation, scoring, SFT, PM, PPO/DPO, evaluation, registry)
calls `assert_no_pickles` first and names its dtype with `torch_dtype`.
"""
from __future__ import annotations

from pathlib import Path

DTYPE_NAMES = ("bfloat16", "float32", "float16")


def torch_dtype(name: str):
    """The torch dtype for a config name; a clear error for any other name.

    >>> torch_dtype("bfloat16")
    torch.bfloat16
    >>> torch_dtype("int8")
    Traceback (most recent call last):
    ValueError: dtype must be one of ['bfloat16', 'float16', 'float32'], got 'int8'
    """
    import torch
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, name)


def dtype_name(dtype) -> str:
    """'bfloat16' for torch.bfloat16: the name configs and metadata files store.

    >>> import torch; dtype_name(torch.float32)
    'float32'
    """
    return str(dtype).removeprefix("torch.")


# CPU features that compute bf16 in hardware (x86: AVX-512 BF16, AMX; Arm: the bf16 extension).
# Without one torch emulates bf16 matmuls and float32 is the faster dtype (bench/bench_dtype.py).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_bf16_support(cpuinfo: Path | str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 in hardware, from the `flags`/`Features` lines of cpuinfo.
    False where the file cannot be read (not Linux): float32 is then the safe choice."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return bool(BF16_CPU_FLAGS & set(value.split()))
    return False


def resolve_dtype(name: str, device: str) -> str:
    """The dtype a backend computes in: `auto` is bfloat16 on a GPU or a CPU with bf16 instructions,
    float32 on other CPUs (measured here, AVX2 only: float32 generates 2.1x and scores 5.2x faster
    than emulated bf16; bench/bench_dtype.py). Any other name is checked and kept.

    >>> resolve_dtype("auto", "cuda"), resolve_dtype("float16", "cpu")
    ('bfloat16', 'float16')
    """
    if name == "auto":
        return "bfloat16" if str(device).startswith("cuda") or cpu_bf16_support() else "float32"
    torch_dtype(name)
    return name


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
