"""SL-CAI: the critique -> revision chain, planned as deterministic steps.

Every step's id is known before any model call: it hashes the step's kind, its parent's id,
the principle, the constitution sha, the model fingerprint, the template sha, the sampling
params and the seed (never the parent's *text*). So the whole chain of a prompt can be
planned up front, a rerun finds what exists by id, and `sl_dataset` is a pure projection.

Waves: 0 = first answers (red-team and helpful); 2r-1 = critique of round r; 2r = revision.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Mapping


from cai_lib.backends import Sampling
from cai_lib.constitution.model import Constitution, CritiquePrinciple
from cai_lib.constitution.templates import critique_chat, effective_templates, initial_chat, revision_chat, template_sha
from cai_lib.ids import derive_seed, stable_id


@dataclass(frozen=True)
class SLSettings:
    rounds: int = 4
    seed: int = 1234
    few_shot: int = 0
    answer: Sampling = Sampling()
    critique: Sampling = Sampling()
    revision: Sampling = Sampling()

    def __post_init__(self):
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")


@dataclass(frozen=True)
class SLContext:
    constitution: Constitution
    model_id: str
    model_fingerprint: str
    backend: str
    settings: SLSettings

    @cached_property
    def template_sha(self) -> str:   # hashed once per context, not once per planned step
        return template_sha(effective_templates(self.constitution), few_shot=self.settings.few_shot,
                            examples=[vars(e) for e in self.constitution.few_shot_critique[:self.settings.few_shot]])

    def constants(self) -> dict:
        return {"constitution_id": self.constitution.id, "constitution_sha": self.constitution.sha256,
                "model_id": self.model_id, "model_fingerprint": self.model_fingerprint,
                "backend": self.backend, "template_sha": self.template_sha}


@dataclass(frozen=True)
class Step:
    event_id: str
    kind: str
    prompt_id: str
    parent_id: str | None
    round: int
    principle_id: str | None
    seed: int
    sampling: str
    wave: int


def sample_principle(ctx: SLContext, prompt_id: str, rnd: int) -> CritiquePrinciple:
    """The round's principle: a seeded draw keyed on (seed, prompt, round), same for critique and revision."""
    pool = ctx.constitution.critique_revision
    if not pool:
        raise ValueError(f"constitution {ctx.constitution.id!r} has no critique_revision principles: "
                         "SL-CAI needs at least one")
    return pool[derive_seed(ctx.settings.seed, "principle", prompt_id, rnd) % len(pool)]


def _step(ctx: SLContext, kind: str, prompt_id: str, parent: str, rnd: int, principle: str | None,
          sampling: Sampling, wave: int) -> Step:
    seed = derive_seed(ctx.settings.seed, prompt_id, kind, rnd)
    eid = stable_id(kind, parents=[parent], principle=principle, constitution=ctx.constitution.sha256,
                    model=ctx.model_fingerprint, template=ctx.template_sha, sampling=sampling.to_json(), seed=seed)
    return Step(eid, kind, prompt_id, None if wave == 0 else parent, rnd, principle, seed, sampling.to_json(), wave)


def plan_chain(ctx: SLContext, prompt_id: str, prompt_kind: str) -> list[Step]:
    s = ctx.settings
    if prompt_kind == "helpful":
        return [_step(ctx, "helpful_response", prompt_id, prompt_id, 0, None, s.answer, 0)]
    steps = [_step(ctx, "initial_response", prompt_id, prompt_id, 0, None, s.answer, 0)]
    for r in range(1, s.rounds + 1):
        p = sample_principle(ctx, prompt_id, r).id
        steps.append(_step(ctx, "critique", prompt_id, steps[-1].event_id, r, p, s.critique, 2 * r - 1))
        steps.append(_step(ctx, "revision", prompt_id, steps[-1].event_id, r, p, s.revision, 2 * r))
    return steps


def step_inputs(chain: list[Step], i: int) -> tuple[str | None, str | None]:
    """(event id of the answer step i works on, of the critique it follows): a critique works on the step
    before it, a revision on the one before its critique; only a revision follows a critique."""
    kind = chain[i].kind
    response = chain[i - 1 if kind == "critique" else i - 2].event_id if i else None
    return response, chain[i - 1].event_id if kind == "revision" else None


def step_chat(ctx: SLContext, chain: list[Step], i: int, prompt: str, texts: Mapping[str, str]) -> list:
    """format_input for step i of a chain, given the texts of the steps before it."""
    step = chain[i]
    response_id, critique_id = step_inputs(chain, i)
    response = texts[response_id] if response_id else None
    critique = texts[critique_id] if critique_id else None
    return chat_for(ctx, step.kind, step.principle_id, prompt, response, critique)


def chat_for(ctx: SLContext, kind: str, principle_id: str | None, prompt: str, response: str | None,
             critique: str | None) -> list:
    """The chat of one step from its inputs: the prompt, the answer it critiques or revises, the critique."""
    if kind in ("initial_response", "helpful_response"):
        return initial_chat(prompt, effective_templates(ctx.constitution))
    principle = ctx.constitution.critique_principle(principle_id)
    if kind == "critique":
        return critique_chat(prompt, response, principle, ctx.constitution, ctx.settings.few_shot)
    return revision_chat(prompt, response, critique, principle, ctx.constitution, ctx.settings.few_shot)
