"""How weights are loaded: safetensors only (unpickling a `.bin`/`.pt` file can run code), and dtypes by name.

Every path that loads weights (generation, scoring, SFT, PM, PPO/DPO, evaluation, registry)
calls `assert_no_pickles` (the one folder check, by name and by content) first and names its dtype with `torch_dtype`.
"""
from __future__ import annotations

import json
import zipfile
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


# ---------------------------------------------------------------- safetensors only
# One check for every model folder the project loads (the default, a user's folder, a cached hub id, a
# registered model's artifacts): it reads file heads and safetensors headers only, never whole weights,
# so the driver runs it before Spark starts and each worker again before it loads.

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SAFETENSORS_MAX_HEADER = 100_000_000   # the safetensors format's own limit on its JSON header
CONVERT = "load once in a sandbox, then save_pretrained, which writes safetensors"


class UnsafeWeights(ValueError):
    """A model folder we refuse to load: pickled weights (by name or content), a weight index naming
    non-safetensors files, a `.safetensors` file that is not one, or no safetensors weights at all."""


def pickle_kind(path: Path) -> str | None:
    """What a file's first bytes say it is, when that is something torch would unpickle: 'pickle data'
    (protocol 2-5 magic, also torch's legacy format) or a zip holding a pickle (torch's zip format,
    whatever the file is named); None otherwise. torch.load decides by the same first bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle data"
    if head == b"PK\x03\x04":
        return zip_pickle_kind(path)
    return None


def zip_pickle_kind(path: Path) -> str | None:
    """'a torch zip archive' for a zip holding a pickle (`data.pkl`, `archive/data.pkl`); it reads only
    the zip's directory. A zip that cannot be listed is refused too: we cannot tell what it holds."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return "a zip archive that cannot be listed"
    return "a torch zip archive" if any(n.endswith((".pkl", ".pickle")) for n in names) else None


def safetensors_problem(path: Path) -> str | None:
    """Why a `.safetensors` file is not one (its 8-byte little-endian header length, then that many
    bytes of JSON object), else None; reads the header only."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if not 0 < n <= min(size - 8, SAFETENSORS_MAX_HEADER):
            return "has no safetensors header (an 8-byte header length that fits the file)"
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError:   # also UnicodeDecodeError
        return "has a safetensors header that is not JSON"
    return None if isinstance(header, dict) else "has a safetensors header that is not a JSON object"


def index_problem(path: Path) -> tuple[str, str] | None:
    """(what is wrong, the fix) for a `*.index.json` whose weight_map names a file that is not a
    `.safetensors` file in its folder; None for a sound index."""
    try:
        shards = sorted({str(s) for s in json.loads(path.read_text())["weight_map"].values()})
    except (ValueError, KeyError, TypeError, AttributeError):
        return "is not a weight index (a JSON object with a weight_map)", "remove it"
    bad = [s for s in shards if not s.endswith(".safetensors")]
    if bad:
        return f"maps weights to {bad}, which are not .safetensors files", f"convert the checkpoint to safetensors ({CONVERT}) or remove the index"
    missing = [s for s in shards if not (path.parent / s).is_file()]
    if missing:
        return f"maps weights to {missing}, which are not in the folder", "copy those shards into the folder"
    return None


def pickle_files(folder: Path, files: list[Path]) -> list[str]:
    """The files torch would unpickle: by name (PICKLE_SUFFIXES), else by content (`NAME (why)`)."""
    found = []
    for p in files:
        name = p.relative_to(folder).as_posix()
        if p.suffix.lower() in PICKLE_SUFFIXES:
            found.append(name)
        elif kind := pickle_kind(p):
            found.append(f"{name} ({kind})")
    return found


def assert_no_pickles(folder: Path | str) -> None:
    """Refuse a model folder we would not load safely, in one sentence naming the folder, the file and
    the fix: pickles by name or content (searched recursively), a `.safetensors` file without a real
    header, a weight index naming non-safetensors files, no `*.safetensors` weights at all.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp()); _ = (d / "model.safetensors").write_bytes(b"\\x02" + bytes(7) + b"{}")
    >>> assert_no_pickles(d)
    >>> _ = (d / "weights.dat").write_bytes(b"\\x80\\x04K\\x01.")
    >>> assert_no_pickles(d)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    cai_lib.backends.weights.UnsafeWeights: model folder ... contains pickle files ['weights.dat (pickle data)']: ...
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"model folder {folder} does not exist or is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    found = pickle_files(folder, files)
    if found:
        raise UnsafeWeights(f"model folder {folder} contains pickle files {found}: refusing to load pickle weight "
                            "files, as unpickling can run arbitrary code and we load safetensors only; convert "
                            f"them to safetensors ({CONVERT}) or remove them")
    for p in files:
        name = p.relative_to(folder).as_posix()
        why = safetensors_problem(p) if p.name.endswith(".safetensors") else None
        if why:
            raise UnsafeWeights(f"model folder {folder}: {name} {why}, so it is not safetensors; re-save the "
                                f"weights as safetensors ({CONVERT}) or remove it")
        problem = index_problem(p) if p.name.endswith(".index.json") else None
        if problem:
            raise UnsafeWeights(f"model folder {folder}: {name} {problem[0]}, so the checkpoint cannot load "
                                f"as safetensors; {problem[1]}")
    if not any(p.parent == folder and p.name.endswith(".safetensors") for p in files):
        raise UnsafeWeights(f"model folder {folder} has no *.safetensors weights and we load safetensors only; "
                            f"convert the checkpoint to safetensors ({CONVERT}) into this folder")
