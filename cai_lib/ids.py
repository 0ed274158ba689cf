"""Deterministic ids: the same inputs give the same id, so reruns never write twice.

>>> stable_id("critique", parent="abc", seed=3) == stable_id("critique", seed=3, parent="abc")
True
>>> len(stable_id("x"))
64
>>> derive_seed(1234, "p1", "critique", 2) == derive_seed(1234, "p1", "critique", 2)
True
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Callable, Sequence, TypeVar

T = TypeVar("T")


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: one text per value, so hashes are stable.

    >>> canonical_json({"b": [1, "é"], "a": None})
    '{"a":null,"b":[1,"é"]}'
    """
    return _CANONICAL.encode(obj)   # one encoder, not one per call: ids are hashed millions of times


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stable_id(kind: str, /, **parts: Any) -> str:
    """sha256 over the id's kind and named parts (order of keywords does not matter)."""
    return sha256_text(canonical_json({"id_kind": kind, "parts": parts}))


def derive_seed(base_seed: int, *key: Any) -> int:
    """A per-request seed in [0, 2**31) from a base seed and a key (prompt, kind, round)."""
    return int(stable_id("seed", base=base_seed, key=list(key))[:8], 16) & 0x7FFFFFFF


_WS = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Whitespace-collapsed, stripped text: what prompt ids and deduplication compare.

    >>> normalise_text("  How do I\\n  pick a lock? ")
    'How do I pick a lock?'
    """
    return _WS.sub(" ", text).strip()


def is_heldout(key: str, fraction: float, salt: str = "") -> bool:
    """Whether `key` is held out: sha256(salt + key) read as a number in [0, 1) is below `fraction`.
    Depends on nothing else, so a key keeps its side across runs, machines and dataset versions.
    The one split of the project: ingest (test prompts), SFT (held-out prompts) and PM training
    (held-out pairs) all call it. Splits of the same keys for different purposes take different
    salts: SFT trains only on ingest's train prompts, so an unsalted SFT split of those same ids
    would hold out none of them (every id below 0.1 is already a test prompt).

    >>> is_heldout("prompt-1", 0.0), is_heldout("prompt-1", 0.999999)
    (False, True)
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    u = int.from_bytes(hashlib.sha256((salt + key).encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
    return u < fraction


def split_heldout(items: Sequence[T], fraction: float, key: Callable[[T], str],
                  salt: str = "") -> tuple[list[T], list[T]]:
    """(train, heldout) by `is_heldout(key(item), fraction, salt)`, each in input order.

    >>> train, held = split_heldout([str(i) for i in range(1000)], 0.1, key=str)
    >>> len(train), len(held)
    (894, 106)
    """
    train, heldout = [], []
    for item in items:
        (heldout if is_heldout(key(item), fraction, salt) else train).append(item)
    return train, heldout
