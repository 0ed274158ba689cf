"""The one backend interface every model engine implements (transformers, vLLM, fake).

- `generate(chats, sampling, seeds)`: one text per chat, sampled with that request's seed.
- `choice_logprobs(prompts, choices)`: for each prompt, the log-probability of each choice
  continuation (e.g. " (A)" and " (B)"), from one pass over the shared prompt.
Batching is the backend's job: callers hand over whole lists.

The rules both real backends (transformers, vLLM) must apply alike live here, once, so they
cannot drift: chat rendering, prompt tokenisation, the prompt-length guard and its error
record, the choice span, how generated tokens become a `Generation` (EOS, stop strings, token
counts) and how a call is counted in `CallStats`. They take the tokenizer as an argument (any
Hugging Face tokenizer: vLLM's `LLM.get_tokenizer()` is one), so this module needs no torch.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence

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
        """The canonical JSON of these settings (part of every generation id), computed once."""
        text = self.__dict__.get("_json")
        if text is None:
            text = canonical_json(asdict(self))
            object.__setattr__(self, "_json", text)
        return text


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


def request_seeds(chats: Sequence[Chat], seeds: Sequence[int]) -> list[int]:
    """One plain int seed per chat, the type both engines' seeding takes (vLLM's
    `SamplingParams.seed: int | None`, torch's `manual_seed`): a float seed is refused, not rounded.

    >>> request_seeds([[], []], [3, 4.0])
    [3, 4]
    >>> request_seeds([[]], [1.5])
    Traceback (most recent call last):
    ValueError: seed 1.5 is not an integer: derive seeds with cai_lib.ids.derive_seed
    """
    check_lengths(chats, seeds)
    out = []
    for s in seeds:
        if int(s) != s:
            raise ValueError(f"seed {s!r} is not an integer: derive seeds with cai_lib.ids.derive_seed")
        out.append(int(s))
    return out


# -- rules shared by the transformers and vLLM backends ---------------------------------------
def render_chat(tokenizer: Any, chat: Chat, add_generation_prompt: bool = True) -> str:
    """The chat as the model's own chat template writes it: the text both engines are given."""
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a rendered prompt, without special tokens: the chat template already wrote
    them. vLLM adds them to a text prompt (`add_special_tokens=True`), so the vLLM backend sends
    these ids instead of the text, and both engines see the same tokens."""
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def length_error(n_tokens: int, max_prompt_tokens: int) -> Generation:
    """The record of a prompt refused for its length, never sent to the model."""
    return Generation(None, n_tokens, 0, "error", f"prompt has {n_tokens} tokens, over max_prompt_tokens={max_prompt_tokens}")


def guard_lengths(lengths: Sequence[int], max_prompt_tokens: int) -> tuple[list[Generation | None], list[int]]:
    """(results holding an error record for each prompt over the limit, indices of the prompts to run).
    A prompt too long for the model fails alone, recorded, instead of failing its whole batch.

    >>> results, keep = guard_lengths([2, 4], 3)
    >>> keep, results[1].finish_reason, results[1].error
    ([0], 'error', 'prompt has 4 tokens, over max_prompt_tokens=3')
    """
    results: list[Generation | None] = [None] * len(lengths)
    keep = []
    for i, n in enumerate(lengths):
        if n > max_prompt_tokens:
            results[i] = length_error(n, max_prompt_tokens)
        else:
            keep.append(i)
    return results, keep


def tokens_through_stop(tokenizer: Any, ids: Sequence[int], stop: Sequence[str]) -> int:
    """How many of `ids` it takes to write the first stop string: what vLLM generates (it stops
    there) and so what both backends count when a stop string cut the text."""
    for k in range(1, len(ids) + 1):
        if cut_at_stop(tokenizer.decode(list(ids[:k]), skip_special_tokens=True), stop)[1]:
            return k
    return len(ids)


def make_generation(tokenizer: Any, n_prompt: int, ids: Sequence[int], stop: Sequence[str], ended: bool) -> Generation:
    """A `Generation` from the generated ids, by one rule for every engine.

    `ids` excludes the token that ended the sequence (EOS or another stop token) and `ended`
    says whether there was one. The text is decoded here, not taken from the engine, and cut at
    the first stop string; `completion_tokens` counts the tokens up to the cut. The finish
    reason is "stop" when the model ended or a stop string cut the text, else "length".
    """
    text, cut = cut_at_stop(tokenizer.decode(list(ids), skip_special_tokens=True), stop)
    n = tokens_through_stop(tokenizer, ids, stop) if cut else len(ids)
    return Generation(text.strip(), n_prompt, n, "stop" if (ended or cut) else "length")


def record_generations(stats: CallStats, results: Sequence[Generation | None]) -> None:
    """Count one model call: the sequences generated and their tokens (refused requests add none)."""
    ran = [r for r in results if r is not None and r.ok]
    stats.generate_calls += 1
    stats.generated_sequences += len(ran)
    stats.prompt_tokens += sum(r.prompt_tokens for r in ran)
    stats.completion_tokens += sum(r.completion_tokens for r in ran)


def common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix every row shares.

    >>> common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]])
    2
    """
    n = 0
    while all(len(r) > n for r in rows) and len({r[n] for r in rows}) == 1:
        n += 1
    return n


def choice_span(tokenizer: Any, prompt: str, choices: Sequence[str]) -> tuple[list[list[int]], int]:
    """(token ids of prompt+choice for each choice, the index where the scored span starts).

    Each prompt+choice is tokenised whole, so a BPE merge across the boundary is the one the
    model would see. The span starts where the choices' tokens first differ, but no later than
    the prompt's own length and no later than the last token of the shortest choice (each
    choice is scored on at least one token). Where a merge swallows the prompt's last token
    (" think" + "ing" -> "thinking"), every choice's span starts before it: the choices are
    scored on the same stretch of text. Both backends score log P(ids[start:] | ids[:start]).

    >>> class Chars:  # one token per character
    ...     def __call__(self, text, add_special_tokens=False):
    ...         return type("Enc", (), {"input_ids": [ord(c) for c in text]})()
    >>> choice_span(Chars(), "Q:", [" A", " B"])[1]
    2
    >>> choice_span(Chars(), "", [" A"])
    Traceback (most recent call last):
    ValueError: choice_logprobs needs a non-empty prompt: the first token has nothing to be conditioned on. Fix: pass the rendered prompt the choices continue
    """
    if not choices:
        raise ValueError("choice_logprobs needs at least one choice")
    full = [prompt_ids(tokenizer, prompt + c) for c in choices]
    start = min(common_prefix(full), len(prompt_ids(tokenizer, prompt)), min(len(f) for f in full) - 1)
    if start < 1:
        raise ValueError("choice_logprobs needs a non-empty prompt: the first token has nothing to be conditioned "
                         "on. Fix: pass the rendered prompt the choices continue")
    return full, start
