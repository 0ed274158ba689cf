"""SL-CAI training examples: chat-rendered rows with loss on the response tokens only.
The training loop is `cai_lib.training.sft`; the held-out split is `cai_lib.ids.split_heldout`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

IGNORE = -100  # the label torch's cross-entropy skips


@dataclass(frozen=True)
class Example:
    key: str
    input_ids: list[int]
    labels: list[int]        # IGNORE (-100) except on the response tokens
    truncated: bool          # the response tail was cut to fit max_length


@dataclass(frozen=True)
class Dropped:
    key: str
    reason: str              # prompt_too_long | empty_response
    detail: str


# ---------------------------------------------------------------- examples

def end_of_turn_ids(tokenizer) -> set[int]:
    eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, list) else [eos]) - {None}


def build_examples(tokenizer, rows: Iterable[Mapping], max_length: int
                   ) -> tuple[list[Example], list[Dropped]]:
    """Tokenized examples with loss on the response only, and the rows that cannot be used.

    rows: dicts with `prompt`, `response`, `key`. See the module docstring for truncation."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: SFT renders rows as a chat, so use an "
                         "instruct/chat model folder (with chat_template.jinja or tokenizer_config)")
    end_ids = end_of_turn_ids(tokenizer)
    examples: list[Example] = []
    dropped: list[Dropped] = []
    for i, row in enumerate(rows):
        missing = [k for k in ("prompt", "response", "key") if not isinstance(row.get(k), str)]
        if missing:
            raise ValueError(f"row {i} lacks string field(s) {missing}: each row needs "
                             "'prompt', 'response' and 'key' (e.g. the prompt id)")
        key, prompt, response = row["key"], row["prompt"], row["response"]
        if not response.strip():
            dropped.append(Dropped(key, "empty_response", "the response is empty or whitespace"))
            continue
        user = [{"role": "user", "content": prompt}]
        prompt_text = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            user + [{"role": "assistant", "content": response}], tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError(f"row {key!r}: the chat template's rendering of the full chat does not "
                             "start with its generation prompt, so the response tokens cannot be "
                             "located; use a model whose template appends the assistant turn")
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) >= max_length:
            dropped.append(Dropped(key, "prompt_too_long",
                                   f"the prompt renders to {len(prompt_ids)} tokens and max_length "
                                   f"is {max_length}: no room for the response"))
            continue
        rest = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        # Loss on the response through the first end-of-turn; template glue after it is masked.
        stop = next((j + 1 for j, t in enumerate(rest) if t in end_ids), len(rest))
        rest_labels = rest[:stop] + [IGNORE] * (len(rest) - stop)
        room = max_length - len(prompt_ids)
        examples.append(Example(key=key, input_ids=prompt_ids + rest[:room],
                                labels=[IGNORE] * len(prompt_ids) + rest_labels[:room],
                                truncated=stop > room))
    return examples, dropped
