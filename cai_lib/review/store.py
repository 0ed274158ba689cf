"""The review app's only door to the lake: reads with delta-rs, verdicts appended with delta-spark.

Reads are confined to the lake's own tables by name (label_events, prompts, generation_events,
review_events, gate_events): nothing a request sends becomes a path; a request's ids are only
values a read filters on. The comparisons are derived from
label_events once per table version (a new labelling run shows up on the next page load).
A verdict is appended with Delta's idempotent write (txnAppId = its event id) when a delta-rs
look-up does not find its event id: one form posted twice, or by two threads at once, lands once
(the loser's retry finds the app id), the look-up still holds after Delta forgets the app id
(TXN_RETENTION), and the append itself reads nothing, so verdicts of two reviewers at once
commute (a Spark anti-join inside the write would make Delta refuse the second one as a
ConcurrentAppendException).
"""
from __future__ import annotations

import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from cai_lib.lake.tables import Lake
from cai_lib.quality.injection import addresses_evaluator
from cai_lib.review.chains import COLUMNS as CHAIN_COLUMNS
from cai_lib.review.queue import Comparison, comparisons
from schemas import REVIEW_EVENTS

LABEL_COLUMNS = ["event_id", "kind", "status", "pair_id", "prompt_id", "response_a_id", "response_b_id", "order",
                 "ensemble_index", "principle_id", "p_a", "p_shown_a", "constitution_id", "constitution_sha",
                 "model_fingerprint", "created_at"]


def read_reviews(lake) -> list[dict]:
    """Every review_events row (`cai review serve` / `cai review import`), all reviewers; none when the lake
    has no such table yet. `lake`: a Lake or a SparkDeltaLake (anything with exists and read)."""
    return lake.read("review_events").to_pylist() if lake.exists("review_events") else []


class ReviewStore:
    def __init__(self, root: str | Path, spark=None):
        self.lake = Lake(root, mode="read")   # a clear error now if --lake is not a lake
        self.spark = spark
        self._cache: tuple[int | None, list[Comparison], dict[str, dict]] | None = None
        self._lock = threading.Lock()
        self._created = False
        self._flagged: tuple[tuple, frozenset[str]] | None = None

    def _labels(self) -> tuple[list[Comparison], dict[str, dict]]:
        """The comparisons and the label rows by event id, recomputed when label_events has a new version."""
        version = self.lake.version("label_events")
        with self._lock:
            if self._cache is None or self._cache[0] != version:
                rows = self.lake.read("label_events", LABEL_COLUMNS).to_pylist()
                self._cache = (version, comparisons(rows), {r["event_id"]: r for r in rows})
            return self._cache[1], self._cache[2]

    def comparisons(self) -> list[Comparison]:
        return self._labels()[0]

    def flagged_responses(self) -> frozenset[str]:
        """The comparisons' response ids (generation_events) whose text addresses the labeller
        (`addresses_evaluator`): the queue's addresses_labeller reason. Recomputed when label_events or
        generation_events has a new version; responses the lake has no text for are not flagged."""
        key = (self.lake.version("label_events"), self.lake.version("generation_events"))
        if self._flagged is not None and self._flagged[0] == key:
            return self._flagged[1]
        ids = sorted({i for c in self.comparisons() for i in (c.response_a_id, c.response_b_id)})
        rows = self._where("generation_events", "event_id", ids, ["event_id", "text"])
        found = frozenset(r["event_id"] for r in rows if r["text"] and addresses_evaluator(r["text"]))
        self._flagged = (key, found)   # one tuple replaced at once: a thread reads the old or the new pair
        return found

    def comparison(self, comparison_id: str) -> Comparison | None:
        return next((c for c in self.comparisons() if c.comparison_id == comparison_id), None)

    def label_rows(self, c: Comparison) -> dict[str, dict]:
        """order -> the label_events row behind a comparison (its p_shown_a, p_a)."""
        rows = self._labels()[1]
        return {rows[e]["order"]: rows[e] for e in c.label_event_ids}

    def _where(self, name: str, column: str, values: list[str], columns: list[str]) -> list[dict]:
        if not self.lake.exists(name):
            return []
        dataset = self.lake.delta_table(name).to_pyarrow_dataset()
        return dataset.to_table(columns=columns, filter=pc.field(column).isin(values)).to_pylist()

    def texts(self, c: Comparison) -> tuple[str | None, dict[str, str | None]]:
        """The comparison's prompt text and its two responses' texts (None where the lake lacks one)."""
        prompt = self._where("prompts", "prompt_id", [c.prompt_id], ["text"])
        ids = [c.response_a_id, c.response_b_id]
        found = {r["event_id"]: r["text"] for r in self._where("generation_events", "event_id", ids, ["event_id", "text"])}
        return (prompt[0]["text"] if prompt else None), {i: found.get(i) for i in ids}

    def texts_of(self, comps: list[Comparison]) -> tuple[dict[str, str], dict[str, str]]:
        """(prompt id -> text, response event id -> text) for many comparisons in one read of each table
        (an export); a comparison whose texts the lake lacks is an error naming it."""
        prompts = {r["prompt_id"]: r["text"] for r in self._where("prompts", "prompt_id",
                                                                   sorted({c.prompt_id for c in comps}), ["prompt_id", "text"])}
        ids = sorted({i for c in comps for i in (c.response_a_id, c.response_b_id)})
        texts = {r["event_id"]: r["text"] for r in self._where("generation_events", "event_id", ids, ["event_id", "text"])}
        for c in comps:
            lacking = [i for i in (c.prompt_id,) if i not in prompts] + \
                [i for i in (c.response_a_id, c.response_b_id) if texts.get(i) is None]
            if lacking:
                raise ValueError(f"comparison {c.comparison_id}: the lake has no text for {lacking} (prompts / "
                                 "generation_events); it cannot be exported. Fix: check `cai lake check`")
        return prompts, texts

    def stored_verdicts(self, event_ids: list[str]) -> dict[str, str]:
        """event id -> verdict of those review_events rows that exist (an import's look-up)."""
        rows = self._where("review_events", "event_id", sorted(set(event_ids)), ["event_id", "verdict"])
        return {r["event_id"]: r["verdict"] for r in rows}

    def insert(self, rows: list[dict]) -> int:
        """Insert verdict rows whose event id review_events lacks (an insert-only MERGE: an import run twice
        lands once); how many it inserted. The web app's single verdicts go through append()."""
        return self._writer("import through `cai review import`").insert_new(
            "review_events", pa.Table.from_pylist(rows, schema=REVIEW_EVENTS))

    def _writer(self, fix: str):
        """The lake's delta-spark writer; an error saying how to get one when this store has no Spark session."""
        from cai_lib.lake.spark_delta import SparkDeltaLake
        if self.spark is None:
            raise ValueError("this review store was opened read-only (no Spark session): verdicts are written "
                             f"with delta-spark. Fix: {fix}, which opens one")
        return SparkDeltaLake(self.spark, self.lake.root)

    def prompt(self, prompt_id: str) -> dict | None:
        """The prompts row (text, kind, category) of one prompt id; None when the lake has none."""
        found = self._where("prompts", "prompt_id", [prompt_id], ["prompt_id", "text", "kind", "category"])
        return found[0] if found else None

    def generations(self, prompt_id: str) -> list[dict]:
        """Every generation_events row of one prompt (the SL chain's columns), for cai_lib.review.chains."""
        return self._where("generation_events", "prompt_id", [prompt_id], CHAIN_COLUMNS)

    def label_p(self) -> dict[str, float]:
        """event id -> p_a (P(A better)) of every ok label row: what a verdict's AI label was."""
        return {e: r["p_a"] for e, r in self._labels()[1].items() if r["status"] == "ok"}

    def all_verdicts(self) -> list[dict]:
        """Every review_events row (all reviewers), for the dashboard."""
        return read_reviews(self.lake)

    def gate_events(self) -> list[dict]:
        """The gates' verdicts (stage, passed, verdict, created_at), for the dashboard's timeline."""
        if not self.lake.exists("gate_events"):
            return []
        return self.lake.read("gate_events", ["event_id", "stage", "passed", "verdict", "created_at", "failed_checks",
                                              "incomplete_checks"]).to_pylist()

    def verdicts(self, reviewer: str) -> list[dict]:
        """The reviewer's review_events rows, oldest first."""
        rows = self._where("review_events", "reviewer", [reviewer], REVIEW_EVENTS.names)
        return sorted(rows, key=lambda r: (r["verdict_at"], r["event_id"]))

    def reviewed(self, reviewer: str) -> set[tuple[str, str]]:
        return {(r["pair_id"], r["principle_id"]) for r in self.verdicts(reviewer)}

    def latest_verdict(self, reviewer: str, comparison_id: str) -> dict | None:
        mine = [r for r in self.verdicts(reviewer) if r["comparison_id"] == comparison_id]
        return mine[-1] if mine else None

    def append(self, row: dict) -> None:
        """Append one verdict row once, whoever else posts it (see the module docstring)."""
        lake = self._writer("start it through `cai review serve`")
        if self._where("review_events", "event_id", [row["event_id"]], ["event_id"]):
            return
        if not self._created:
            lake.table("review_events")
            self._created = True
        rows = self.spark.createDataFrame(pa.Table.from_pylist([row], schema=REVIEW_EVENTS))
        lake.idempotent_append("review_events", rows, f"review_events/{row['event_id']}")
