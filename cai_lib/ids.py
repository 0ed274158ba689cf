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
from typing import Any


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no spaces: one text per value, so hashes are stable."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


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
