"""A prompt's SL-CAI chains, from its generation_events rows: the first answer, then critique -> revision
round by round (each round's principle_id on both). Pure: rows in, chains out.

A chain follows `parent_id` links (critique -> the answer it critiques, revision -> its critique,
next critique -> that revision) from a first answer. One prompt can hold several chains (another
constitution, model or seed gives another first answer id), and a rerun that changed a round's
settings forks a chain at that round: every root-to-leaf path is its own chain, oldest first.
Failed attempts (status failed) are not steps; they are counted beside the chains.

    >>> rows = [gen("a", "initial_response"), gen("c1", "critique", "a", 1, "harm"), gen("r1", "revision", "c1", 1, "harm")]
    >>> [c] = chains(rows)[0]
    >>> [s["event_id"] for s in c.steps], [(r.round, r.principle_id, r.critique["event_id"], r.revision["event_id"])
    ...                                    for r in c.rounds]
    (['a', 'c1', 'r1'], [(1, 'harm', 'c1', 'r1')])
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Iterator

ROOTS = ("initial_response", "helpful_response")
CHAIN_KINDS = ROOTS + ("critique", "revision")
COLUMNS = ["event_id", "kind", "status", "parent_id", "round", "principle_id", "constitution_id", "constitution_sha",
           "model_id", "text", "finish_reason", "created_at"]


@dataclass(frozen=True)
class Round:
    round: int
    principle_id: str | None
    critique: dict
    revision: dict | None       # None: the run stopped after the critique


@dataclass(frozen=True)
class Chain:
    steps: tuple[dict, ...]     # generation_events rows, the first answer first

    @property
    def root(self) -> dict:
        return self.steps[0]

    @property
    def rounds(self) -> list[Round]:
        out = []
        for s in self.steps[1:]:
            if s["kind"] == "critique":
                out.append(Round(s["round"], s["principle_id"], s, None))
            elif out and out[-1].revision is None:
                out[-1] = Round(out[-1].round, out[-1].principle_id, out[-1].critique, s)
        return out

    @property
    def final(self) -> dict:
        """The last answer: the latest revision, or the first answer when no round finished."""
        return next((s for s in reversed(self.steps) if s["kind"] != "critique"), self.root)


def _order(r: dict) -> tuple:
    return (r["round"], CHAIN_KINDS.index(r["kind"]), r["created_at"], r["event_id"])


def chains(rows: Iterable[dict]) -> tuple[list[Chain], int]:
    """(the prompt's chains, oldest first root; how many failed attempts its rows hold). Rows of other
    kinds (pair samples, CoT, evaluation answers) are not part of SL-CAI and are ignored."""
    ok, failed = [], 0
    for r in rows:
        if r["kind"] not in CHAIN_KINDS:
            continue
        if r["status"] == "ok":
            ok.append(r)
        else:
            failed += 1
    children: dict[str, list[dict]] = defaultdict(list)
    for r in ok:
        if r["kind"] not in ROOTS and r["parent_id"] is not None:
            children[r["parent_id"]].append(r)
    roots = sorted((r for r in ok if r["kind"] in ROOTS), key=lambda r: (r["created_at"], r["event_id"]))
    return [Chain(tuple(p)) for root in roots for p in _paths(root, children)], failed


def _paths(node: dict, children: dict[str, list[dict]]) -> Iterator[list[dict]]:
    kids = sorted(children.get(node["event_id"], []), key=_order)
    if not kids:
        yield [node]
    for kid in kids:
        for rest in _paths(kid, children):
            yield [node] + rest


def gen(event_id: str, kind: str, parent: str | None = None, rnd: int = 0, principle: str | None = None, *,
        status: str = "ok", text: str | None = None, created_at: int = 0) -> dict:
    """A minimal generation_events row (the fields this module reads), for doctests and tests."""
    return {"event_id": event_id, "kind": kind, "status": status, "parent_id": parent, "round": rnd,
            "principle_id": principle, "constitution_id": "default", "constitution_sha": "c" * 64, "model_id": "m",
            "text": text if text is not None else f"text of {event_id}", "finish_reason": "stop",
            "created_at": created_at}
