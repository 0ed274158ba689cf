"""Code that runs inside Spark's Python workers: one loaded backend per worker process.

The cache lives in this importable module (not `__main__`), and Spark reuses Python workers
(`spark.python.worker.reuse`), so a worker loads its model once and keeps it across tasks.

A vLLM engine runs inside the worker process (VLLM_ENABLE_V1_MULTIPROCESSING=0, unless the
environment chooses): Spark's daemon ends a worker with os._exit, SIGHUP or SIGKILL, none of which
runs Python's exit hooks, so an engine process spawned beside the worker could outlive it and keep
its memory (or GPU). In-process, the engine ends with the worker; a normal exit or a switch to
another spec also closes it (`release_backends`).
"""
from __future__ import annotations

import atexit
import gc
import json
import os
from typing import Iterator

import pyarrow as pa

from cai_lib.backends import Sampling, load_backend

_BACKENDS: dict[str, object] = {}
LOADS: list[str] = []   # the specs this process loaded, in order: tests read it through a Spark task


def backend_for(spec_json: str):
    """The worker's backend for this spec, loading it (once) on first use."""
    if spec_json not in _BACKENDS:
        release_backends()  # one model per worker: free the old one before loading another
        spec = json.loads(spec_json)
        if spec["backend"] == "vllm":
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # the engine ends with this worker
        _BACKENDS[spec_json] = load_backend(spec.pop("backend"), spec.pop("model"), **spec)
        LOADS.append(spec_json)
    return _BACKENDS[spec_json]


def release_backends() -> None:
    """Close every loaded backend that holds an engine (vLLM's), then drop them all."""
    for backend in _BACKENDS.values():
        close = getattr(backend, "close", None)
        if close is not None:
            close()
    _BACKENDS.clear()
    gc.collect()


atexit.register(release_backends)


def generate_batch(backend, chats: list, sampling: Sampling, seeds: list[int]):
    """One backend.generate call; when it raises, each request alone, so one bad request fails alone
    (recorded as a failed event, never dropped) and the rest still count."""
    try:
        return backend.generate(chats, sampling, seeds)
    except Exception:  # noqa: BLE001 - isolate the failing request(s)
        from cai_lib.backends import Generation
        out = []
        for chat, seed in zip(chats, seeds):
            try:
                out.extend(backend.generate([chat], sampling, [seed]))
            except Exception as exc:  # noqa: BLE001 - recorded as a failed event, never dropped
                out.append(Generation(None, 0, 0, "error", f"{type(exc).__name__}: {exc}"[:2000]))
        return out


SCORE_DDL = "task_idx long, logprob_a double, logprob_b double, error string"
SCORE_SCHEMA = pa.schema([("task_idx", pa.int64()), ("logprob_a", pa.float64()), ("logprob_b", pa.float64()),
                          ("error", pa.string())])


def score_batch(backend, prompts: list[str], choices) -> list[tuple[list, str | None]]:
    """(log-probs of each choice, error) per prompt: one backend call; when it raises, each prompt alone,
    so a failing prompt fails alone (quarantined, never dropped)."""
    try:
        return [(lp, None) for lp in backend.choice_logprobs(prompts, choices)]
    except Exception:  # noqa: BLE001 - isolate the failing prompt(s)
        scored = []
        for p in prompts:
            try:
                scored.append((backend.choice_logprobs([p], choices)[0], None))
            except Exception as exc:  # noqa: BLE001
                scored.append(([None, None], f"{type(exc).__name__}: {exc}"[:2000]))
        return scored


def score_partition(batches: Iterator[pa.RecordBatch], spec_json: str, choices_json: str, calls) -> Iterator[pa.RecordBatch]:
    """mapInArrow body for labelling: render each chat, append its suffix, score the choices."""
    batches = list(batches)
    table = pa.Table.from_batches(batches) if batches else None
    if table is None or table.num_rows == 0:   # an empty partition may bring no batch at all
        return
    backend = backend_for(spec_json)
    choices = json.loads(choices_json)
    rows = sorted(table.to_pylist(), key=lambda r: r["task_idx"])
    scored = score_batch(backend, [backend.render_chat(json.loads(r["chat"])) + r["suffix"] for r in rows], choices)
    calls.add(1)
    yield pa.RecordBatch.from_pylist([
        {"task_idx": r["task_idx"], "logprob_a": lp[0], "logprob_b": lp[1], "error": err}
        for r, (lp, err) in zip(rows, scored)], schema=SCORE_SCHEMA)
