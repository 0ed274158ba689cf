"""Ingest prompt files into the `prompts` table (bad rows -> `quarantine`, with a reason).

    cai ingest --lake lake --source data/demo/red_team_prompts.jsonl --kind red_team
    cai ingest --lake lake --source ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz --kind red_team
    cai ingest                       # the `sources` listed in params.yaml [ingest]
    spark-submit launch/cai_task.py ingest --source FILE --kind helpful

Accepts the project's JSONL/CSV prompt files (a `prompt` or `text` column), HH-RLHF pairs
(jsonl/.gz: the first human turn of `chosen`) and red-team attempts (a JSON array or JSONL).
All files are read and checked before anything is written: an unreadable file is an error
that writes nothing. Ids are deterministic (kind + normalised text), so re-ingesting the same
file adds nothing; the summary counts every row read (`read`), the prompts repeated within the
run (`duplicates`), the new ones (`inserted`) and those the lake had (`already_present`). A
source in params.yaml may say `split: test` (an evaluation set: all its rows held out, never
trained on) and `limit: N, seed: S` (a seeded sample of N rows). Reading is plain Python (files
are small next to LLM work); no Spark session is started.
"""
from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa

from cai_lib.config import LakeConfig, PointerConfig, check_fields, load_config, opt
from cai_lib.ids import is_heldout, normalise_text, sha256_text, stable_id
from cai_lib.runtime.tasks import new_job_run_id
from cai_lib.sources.prompts import MAX_PROMPT_CHARS, SourceError, read_prompt_source
from jobs.common import report, write_pointer, writer_lake
from schemas import PROMPT_KINDS


@dataclass
class IngestConfig(LakeConfig, PointerConfig):
    source: str | None = opt(None, "one prompt file to ingest (else the `sources` list from params.yaml)")
    kind: str | None = opt(None, "red_team | helpful: the kind of --source (needed when the file does not say)",
                           choices=PROMPT_KINDS)
    sources: list = opt([], "params.yaml only: [{path, kind, split, limit, seed}] files ingested by a plain "
                        "`cai ingest` (split: test = every row held out for evaluation; limit + seed = a seeded "
                        "sample of the file's rows)", flag=False)
    split: str = opt("hash", "split of --source's rows: hash (by prompt id and test_fraction) | train | test "
                             "(test: an evaluation set, never trained on)", choices=("hash", "train", "test"))
    limit: int = opt(0, "keep a seeded sample of this many of --source's rows (0 = all)", lo=0)
    sample_seed: int = opt(0, "seed of --limit's sample", lo=0)
    test_fraction: float = opt(0.1, "share of prompts held out as split=test (by prompt id, deterministic)",
                               lo=0.0, lt=1.0)
    max_bad_fraction: float = opt(0.5, "refuse a file when more than this share of its rows is bad", lo=0.0, hi=1.0)
    max_prompt_chars: int = opt(MAX_PROMPT_CHARS, "longer prompts are quarantined with the reason, never stored",
                                lo=1, hi=1_000_000)

    def __post_init__(self):
        check_fields(self)   # bounds and choices, as load_config checks them, for configs built in code

    def files(self) -> list[Source]:
        if self.source:
            return [Source.of(None, {"path": self.source, "kind": self.kind, "seed": self.sample_seed,
                                     "split": None if self.split == "hash" else self.split,
                                     "limit": self.limit or None})]
        if not self.sources:
            raise ValueError("nothing to ingest: pass --source FILE [--kind red_team|helpful] "
                             "or list `sources` under [ingest] in params.yaml")
        return [Source.of(i, s) for i, s in enumerate(self.sources)]


@dataclass(frozen=True)
class Source:
    """One prompt file to ingest. `split` forces every row's split (test: an evaluation set, never
    trained on) instead of the id hash; `limit` keeps a seeded sample of that many rows."""
    path: str
    kind: str | None = None
    split: str | None = None
    limit: int | None = None
    seed: int = 0

    @classmethod
    def of(cls, i: int | None, entry) -> "Source":
        where = "--source" if i is None else f"params.yaml [ingest] sources[{i}]"
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise ValueError(f"{where}: expected {{path: FILE, kind: red_team|helpful}}, got {entry!r}")
        unknown = sorted(set(entry) - {"path", "kind", "split", "limit", "seed"})
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; a source takes path, kind, split, limit, seed")
        src = cls(**entry)
        if src.kind is not None and src.kind not in PROMPT_KINDS:
            raise ValueError(f"{where} kind must be one of {PROMPT_KINDS}, got {src.kind!r}")
        if src.split not in (None, "train", "test"):
            raise ValueError(f"{where} split must be train or test (or absent: by id hash), got {src.split!r}")
        if src.limit is not None and (isinstance(src.limit, bool) or not isinstance(src.limit, int) or src.limit < 1):
            raise ValueError(f"{where} limit must be a positive integer, got {src.limit!r}")
        return src

    def sample(self, records: list) -> list:
        """A seeded sample of `limit` records, in file order (all of them without a limit)."""
        if self.limit is None or self.limit >= len(records):
            return records
        keep = sorted(random.Random(self.seed).sample(range(len(records)), self.limit))
        return [records[i] for i in keep]


def split_of(prompt_id: str, test_fraction: float) -> str:
    """train/test from the id's hash (`cai_lib.ids.is_heldout`, unsalted; SFT splits these ids again with its own salt):
    stable across runs, machines and file order."""
    return "test" if is_heldout(prompt_id, test_fraction) else "train"


def prompt_id_of(kind: str, text: str) -> str:
    return stable_id("prompt", kind=kind, text=normalise_text(text))


def run(spark, cfg: IngestConfig) -> dict:
    lake = writer_lake(cfg, "ingest", mode="create")   # ingest may start a lake; a bad target fails before reading
    job_run_id = new_job_run_id()
    now = datetime.now(timezone.utc)
    prompts, quarantine, seen = [], [], set()
    read_rows = duplicates = 0
    for src in cfg.files():
        path, kind = src.path, src.kind
        # a SourceError (unreadable file, too many bad rows) stops the run before anything is written
        read = read_prompt_source(path, max_bad_fraction=cfg.max_bad_fraction, max_prompt_chars=cfg.max_prompt_chars)
        sampled = src.sample(read.records)
        read_rows += len(sampled) + len(read.rejected)
        for rec in sampled:
            rec_kind = kind or rec.kind
            if rec_kind is None:
                raise SourceError(f"{path}: the file does not say whether its prompts are red_team or helpful "
                                  f"({read.format} format); pass --kind red_team or --kind helpful")
            if rec.kind and kind and rec.kind != kind:
                quarantine.append(dict(source=path, source_row=rec.source_row, field="kind",
                                       reason=f"row says kind {rec.kind!r} but --kind is {kind!r}", payload=rec.text))
                continue
            pid = prompt_id_of(rec_kind, rec.text)
            if pid in seen:
                duplicates += 1   # the same prompt twice: the first occurrence is the row of record
                continue
            seen.add(pid)
            prompts.append({
                "prompt_id": pid, "text": rec.text, "kind": rec_kind, "source": path, "source_row": rec.source_row,
                "source_format": read.format, "category": rec.category, "tags": list(rec.tags),
                "split": src.split or split_of(pid, cfg.test_fraction),
                "meta": json.dumps(rec.meta, sort_keys=True, ensure_ascii=False) if rec.meta else None,
                "created_at": now,
            })
        for bad in read.rejected:
            quarantine.append(dict(source=bad.source, source_row=bad.source_row, field=bad.field,
                                   reason=bad.reason, payload=bad.payload))
    q_rows = [{**q, "stage": "ingest", "job_run_id": job_run_id, "created_at": now, "row_key": None,
               "event_id": stable_id("quarantine", stage="ingest", source=q["source"], row=q["source_row"],
                                     reason=q["reason"], payload=sha256_text(q["payload"] or ""))}
              for q in quarantine]
    before = lake.count("prompts")
    inserted = lake.insert_new("prompts", pa.Table.from_pylist(prompts)) if prompts else 0
    quarantined = lake.insert_new("quarantine", pa.Table.from_pylist(q_rows)) if q_rows else 0
    # every row read is counted: a duplicate (its prompt came earlier in this run), a bad row (quarantined;
    # a rerun finds the same rows, already quarantined), or a distinct prompt (inserted or already present)
    summary = {"files": len(cfg.files()), "read": read_rows, "duplicates": duplicates, "inserted": inserted,
               "already_present": len(prompts) - inserted, "quarantined": quarantined,
               "prompts_total": before + inserted}
    write_pointer(cfg.pointer, lake, ["prompts", "quarantine"])
    return summary


def main(argv=None) -> int:
    cfg = load_config(IngestConfig, "ingest", argv, __doc__)
    summary = run(None, cfg)
    report("ingest", summary)
    return 0


if __name__ == "__main__":
    from jobs.common import refuse_script_run
    sys.exit(refuse_script_run("ingest"))
