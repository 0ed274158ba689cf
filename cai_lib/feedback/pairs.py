"""RLAIF pairs: two sampled responses per red-team prompt from the policy under study.

A pair sample's id hashes the prompt, the sample index, the model fingerprint, the template,
the sampling params and the seed, so resampling is idempotent and resumable like SL-CAI.
The constitution plays no part in sampling (it judges the pairs later), so it is not in the id.
"""
from __future__ import annotations

from typing import Mapping

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
