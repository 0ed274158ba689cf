"""The one backend interface every model engine implements (transformers, vLLM, fake).

- `generate(chats, sampling, seeds)`: one text per chat, sampled with that request's seed.
- `choice_logprobs(prompts, choices)`: for each prompt, the log-probability of each choice
  continuation (e.g. " (A)" and " (B)"), from one pass over the shared prompt.
Batching is the backend's job: callers hand over whole lists.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol, Sequence

from cai_lib.ids import canonical_json

Chat = list[dict[str, str]]  # [{"role": "user"|"assistant"|"system", "content": str}, ...]


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7   # 0 = greedy
    top_p: float = 0.9
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()  # the text is cut at the first stop string

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        object.__setattr__(self, "stop", tuple(self.stop))

    def to_json(self) -> str:
        return canonical_json(asdict(self))


@dataclass
class Generation:
    text: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"  # stop | length | error
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class CallStats:
    """What a backend did, for benchmarks and the 'no model calls on a rerun' check."""
    generate_calls: int = 0
    generated_sequences: int = 0
    completion_tokens: int = 0
    prompt_tokens: int = 0
    scoring_calls: int = 0
    extra: dict = field(default_factory=dict)


class Backend(Protocol):
    name: str          # "transformers" | "vllm" | "fake"
    model_id: str      # what the user asked for ("default", a folder, a hub id)
    fingerprint: str   # sha256 identifying the weights and config (part of event ids)
    stats: CallStats

    def generate(self, chats: Sequence[Chat], sampling: Sampling, seeds: Sequence[int]) -> list[Generation]: ...

    def render_chat(self, chat: Chat, add_generation_prompt: bool = True) -> str: ...

    def choice_logprobs(self, prompts: Sequence[str], choices: Sequence[str]) -> list[list[float]]: ...


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut `text` at the earliest stop string.

    >>> cut_at_stop("Sure.\\n\\nHuman: more", ["\\n\\nHuman:"])
    ('Sure.', True)
    >>> cut_at_stop("Sure.", ["\\n\\nHuman:"])
    ('Sure.', False)
    """
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def check_lengths(chats: Sequence[Chat], seeds: Sequence[int]) -> None:
    if len(chats) != len(seeds):
        raise ValueError(f"generate got {len(chats)} chats but {len(seeds)} seeds: pass one seed per chat")
