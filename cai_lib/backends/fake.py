"""A deterministic backend with the real interface, for fast tests of pure logic.

Text and scores are functions of the request and seed alone. Never the only test of a
capability: the transformers backend runs the same paths in the slow tests.
"""
from __future__ import annotations

import math
import time
from typing import Sequence

from cai_lib.backends.base import CallStats, Chat, Generation, Sampling, check_lengths
from cai_lib.ids import canonical_json, sha256_text

FAKE_FINGERPRINT = sha256_text("fake-backend-v1")
FAKE_IDS = ("fake", "fake:", "fail-on:")   # "fake", "fake:NAME", or "fail-on:TEXT" (failure tests)


class FakeTaskFault(BaseException):
    """A Spark task dying after its model call ("fake:fault=raise-once@MARKER"): a BaseException, so
    no per-request isolation catches it and the task itself fails (and Spark retries it)."""


def fake_fingerprint(model_id: str) -> str:
    """The judges that score differently ("fake:prefer=WORD", "fake:constant") are other models:
    their labels must not share event ids with the plain fake's."""
    if model_id == "fake:constant" or model_id.startswith("fake:prefer="):
        return sha256_text(f"fake-backend-v1:{model_id}")
    return FAKE_FINGERPRINT


def check_fake_model(backend: str, model_id: str) -> None:
    """The fake backend writes test text, so it takes fake model ids only: never a real or
    registered model's name, under which its text would be recorded.

    >>> check_fake_model("fake", "fake"); check_fake_model("transformers", "cai-sl")
    >>> check_fake_model("fake", "cai-sl")
    Traceback (most recent call last):
    ValueError: the fake backend writes deterministic test text, not model output, so it refuses the model 'cai-sl' (its text would be recorded under that model's id). Fix: pass the model id 'fake' (or 'fake:NAME') with --backend fake, or --backend transformers|vllm for a real model
    """
    if backend == "fake":
        fake_latency(model_id)   # a bad latency fails on the driver, before Spark starts a task
    if backend == "fake" and not (model_id == "fake" or model_id.startswith(FAKE_IDS[1:])):
        raise ValueError(f"the fake backend writes deterministic test text, not model output, so it refuses the "
                         f"model {model_id!r} (its text would be recorded under that model's id). Fix: pass the "
                         f"model id 'fake' (or 'fake:NAME') with --backend fake, or --backend transformers|vllm "
                         f"for a real model")


def fake_latency(model_id: str) -> float:
    """Seconds every model call of "fake:latency=S" sleeps (0 for other ids): the fake at a real engine's
    speed (S = 0.2: a GPU's batch of ~100-token answers), so a bench shows what the plane's fixed costs
    leave of it. Same text and ids as "fake".

    >>> fake_latency("fake:latency=0.2"), fake_latency("fake")
    (0.2, 0.0)
    >>> fake_latency("fake:latency=fast")
    Traceback (most recent call last):
    ValueError: fake model 'fake:latency=fast': the latency must be a number of seconds >= 0 and finite, like fake:latency=0.2
    """
    if not model_id.startswith("fake:latency="):
        return 0.0
    try:
        seconds = float(model_id[len("fake:latency="):])
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < math.inf:
        raise ValueError(f"fake model {model_id!r}: the latency must be a number of seconds >= 0 and finite, "
                         f"like fake:latency=0.2")
    return seconds


class FakeBackend:
    name = "fake"

    def __init__(self, model_id: str = "fake", **_: object):
        self.model_id = model_id
        self.fingerprint = fake_fingerprint(model_id)
        self.stats = CallStats()
        # model id "fail-on:TEXT": requests whose chat contains TEXT fail (tests of failure handling;
        # the id travels to Spark workers with the backend spec, unlike an attribute set here)
        self.fail_when: str | None = model_id[len("fail-on:"):] if model_id.startswith("fail-on:") else None
        # "fake:prefer=WORD": a judge that knows something: it picks the option whose response holds
        # WORD (P = 0.9). "fake:constant": a judge that knows nothing and says so, P = 0.5 everywhere.
        self.prefer: str | None = model_id[len("fake:prefer="):] if model_id.startswith("fake:prefer=") else None
        self.constant = model_id == "fake:constant"
        # "fake:fault=raise-once@PATH" / "fake:fault=exit-once@PATH": the first generate call (the one that
        # creates PATH) makes its text, then fails its Spark task, or kills its Python worker. Same
        # text and ids as "fake": what a retried task writes can be compared with an undisturbed run.
        fault = model_id[len("fake:fault="):] if model_id.startswith("fake:fault=") else ""
        self.fault, _, self.fault_marker = fault.partition("@")
        # "fake:slow=SECONDS": a Spark task's first attempt sleeps that long in each generate call, a copy
        # (a speculative attempt) does not: the copy wins (speculation tests). Same text and ids as "fake".
        self.slow = float(model_id[len("fake:slow="):]) if model_id.startswith("fake:slow=") else 0.0
        self.latency = fake_latency(model_id)

    def render_chat(self, chat: Chat, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in chat)
        return text + ("<assistant>" if add_generation_prompt else "")

    def generate(self, chats: Sequence[Chat], sampling: Sampling, seeds: Sequence[int]) -> list[Generation]:
        check_lengths(chats, seeds)
        self.stats.generate_calls += 1
        if self.latency:   # every call, every attempt: the engine's time per batch
            time.sleep(self.latency)
        out = []
        for chat, seed in zip(chats, seeds):
            if self.fail_when and self.fail_when in canonical_json(chat):
                out.append(Generation(None, 0, 0, "error", f"fake failure on {self.fail_when!r}"))
                continue
            h = sha256_text(canonical_json([chat, seed, sampling.to_json()]))
            words = ["fake", chat[-1]["content"].split()[0] if chat[-1]["content"].split() else "", h[:12]]
            text = " ".join(w for w in words if w)[: sampling.max_new_tokens * 4]
            n_prompt = sum(len(m["content"].split()) for m in chat)
            out.append(Generation(text, n_prompt, len(text.split()), "stop"))
            self.stats.generated_sequences += 1
            self.stats.prompt_tokens += n_prompt
            self.stats.completion_tokens += len(text.split())
        self._fault_once()
        self._slow_first_attempt()
        return out

    def _slow_first_attempt(self) -> None:
        if not self.slow:
            return
        from pyspark import TaskContext
        task = TaskContext.get()
        if task is not None and task.attemptNumber() == 0:
            time.sleep(self.slow)

    def _fault_once(self) -> None:
        import os
        if not self.fault:
            return
        try:
            os.close(os.open(self.fault_marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return   # the fault happened already: this is the retry
        if self.fault == "exit-once":
            os._exit(17)
        raise FakeTaskFault(f"fake fault after the model call ({self.fault})")

    def _preference(self, prompt: str, n_choices: int) -> list[float] | None:
        """Log-probs of a judge that reads the two options (the comparison template's delimiters)."""
        if self.constant:
            return [math.log(1 / n_choices)] * n_choices
        if not self.prefer:
            return None
        holds = [self.prefer in prompt.partition(f"<response_{x}>")[2].partition(f"</response_{x}>")[0]
                 for x in ("a", "b")]
        p_a = 0.9 if holds == [True, False] else 0.1 if holds == [False, True] else 0.5
        return [math.log(p_a), math.log(1 - p_a)] + [math.log(1e-6)] * (n_choices - 2)

    def choice_logprobs(self, prompts: Sequence[str], choices: Sequence[str]) -> list[list[float]]:
        self.stats.scoring_calls += 1
        if self.latency:
            time.sleep(self.latency)
        rows = []
        for p in prompts:
            if self.fail_when and self.fail_when in p:
                raise RuntimeError(f"fake scoring failure on {self.fail_when!r}")
            judged = self._preference(p, len(choices))
            if judged is not None:
                rows.append(judged)
                continue
            raw = [int(sha256_text(p + c)[:6], 16) / 0xFFFFFF for c in choices]
            z = math.log(sum(math.exp(r) for r in raw))
            rows.append([r - z for r in raw])
        return rows
