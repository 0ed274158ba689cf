"""RLAIF pairs: two sampled responses per red-team prompt from the policy under study.

A pair sample's id hashes the prompt, the sample index, the model fingerprint, the template,
the sampling params and the seed, so resampling is idempotent and resumable like SL-CAI.
The constitution plays no part in sampling (it judges the pairs later), so it is not in the id.
"""
from __future__ import annotations

from typing import Iterator, Mapping

import pyarrow as pa

from cai_lib.backends import Sampling
from cai_lib.constitution.templates import DEFAULT_TEMPLATES, initial_chat, template_sha
from cai_lib.ids import derive_seed, stable_id
from cai_lib.runtime.tasks import Task

PAIR_TEMPLATE_SHA = template_sha(DEFAULT_TEMPLATES, names=("initial",))


def pair_sample_tasks(prompts: Mapping[str, str], *, fingerprint: str, sampling: Sampling, seed: int,
                      n_samples: int = 2) -> list[Task]:
    """One task per (prompt, sample index); the caller filters out ids already present."""
    tasks = []
    for pid in sorted(prompts):
        for i in range(n_samples):
            s = derive_seed(seed, pid, "pair_sample", i)
            eid = stable_id("pair_sample", parents=[pid], sample=i, model=fingerprint,
                            template=PAIR_TEMPLATE_SHA, sampling=sampling.to_json(), seed=s)
            tasks.append(Task(eid, "pair_sample", pid, None, i, None, s, sampling.to_json(),
                              initial_chat(prompts[pid], DEFAULT_TEMPLATES)))
    return tasks


def pair_id_of(prompt_id: str, a_id: str, b_id: str) -> str:
    return stable_id("pair", prompt=prompt_id, a=a_id, b=b_id)


# The Spark-native data plane: the tasks are planned in the executors.

SAMPLE_SCHEMA = pa.schema([
    ("event_id", pa.string()), ("kind", pa.string()), ("prompt_id", pa.string()), ("parent_id", pa.string()),
    ("round", pa.int32()), ("principle_id", pa.string()), ("seed", pa.int64()), ("sampling", pa.string()),
    ("prompt_text", pa.string()), ("input_len", pa.int64()),
])


def sample_partition(batches: Iterator[pa.RecordBatch], *, fingerprint: str, sampling: Sampling, seed: int,
                     n_samples: int) -> Iterator[pa.RecordBatch]:
    """mapInArrow body: (prompt_id, text) rows -> one row per pair sample task (`pair_sample_tasks`)."""
    for batch in batches:
        texts = dict(zip(batch.column("prompt_id").to_pylist(), batch.column("text").to_pylist()))
        tasks = pair_sample_tasks(texts, fingerprint=fingerprint, sampling=sampling, seed=seed, n_samples=n_samples)
        if tasks:
            yield pa.RecordBatch.from_pylist([
                {"event_id": t.event_id, "kind": t.kind, "prompt_id": t.prompt_id, "parent_id": None,
                 "round": t.round, "principle_id": None, "seed": t.seed, "sampling": t.sampling,
                 "prompt_text": texts[t.prompt_id], "input_len": len(texts[t.prompt_id])} for t in tasks],
                schema=SAMPLE_SCHEMA)


def sample_chat(row: dict) -> list:
    """A pair sample's chat from its plan row (picklable, for the executors)."""
    return initial_chat(row["prompt_text"], DEFAULT_TEMPLATES)
