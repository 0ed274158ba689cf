"""Ingest prompt files into the `prompts` table (bad rows -> `quarantine`, with a reason).

    cai ingest --lake lake --source data/demo/red_team_prompts.jsonl --kind red_team
    cai ingest --lake lake --source ../shared/data/hh-rlhf/harmless-base/test.jsonl.gz --kind red_team
    cai ingest                       # the `sources` listed in params.yaml [ingest]
    spark-submit launch/cai_task.py ingest --source FILE --kind helpful

Accepts the project's JSONL/CSV prompt files (a `prompt` or `text` column), HH-RLHF pairs
(jsonl/.gz: the first human turn of `chosen`) and red-team attempts (a JSON array or JSONL).
All files are read and checked before anything is written: an unreadable file is an error
that writes nothing. Ids are deterministic (kind + normalised text), so re-ingesting the same
file adds nothing. Reading is plain Python (files are small next to LLM work); no Spark session
is started.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa

from cai_lib.config import LakeConfig, PointerConfig, load_config, opt
from cai_lib.ids import is_heldout, normalise_text, sha256_text, stable_id
from cai_lib.lake.tables import Lake
from cai_lib.runtime.tasks import new_job_run_id
from cai_lib.sources.prompts import MAX_PROMPT_CHARS, SourceError, read_prompt_source
from jobs.common import report, write_pointer
from schemas import PROMPT_KINDS


@dataclass
class IngestConfig(LakeConfig, PointerConfig):
    source: str | None = opt(None, "one prompt file to ingest (else the `sources` list from params.yaml)")
    kind: str | None = opt(None, "red_team | helpful: the kind of --source (needed when the file does not say)")
    sources: list = opt([], "params.yaml only: [{path, kind}] files ingested by a plain `cai ingest`",
                        flag=False)
    test_fraction: float = opt(0.1, "share of prompts held out as split=test (by prompt id, deterministic)")
    max_bad_fraction: float = opt(0.5, "refuse a file when more than this share of its rows is bad")
    max_prompt_chars: int = opt(MAX_PROMPT_CHARS, "longer prompts are quarantined with the reason, never stored")

    def __post_init__(self):
        if self.kind is not None and self.kind not in PROMPT_KINDS:
            raise ValueError(f"--kind must be one of {PROMPT_KINDS}, got {self.kind!r}")
        if not 0 <= self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")

    def files(self) -> list[tuple[str, str | None]]:
        if self.source:
            return [(self.source, self.kind)]
        if not self.sources:
            raise ValueError("nothing to ingest: pass --source FILE [--kind red_team|helpful] "
                             "or list `sources` under [ingest] in params.yaml")
        return [(s["path"], s.get("kind")) for s in self.sources]


def split_of(prompt_id: str, test_fraction: float) -> str:
    """train/test from the id's hash (`cai_lib.ids.is_heldout`, unsalted; SFT splits these ids again with its own salt):
    stable across runs, machines and file order."""
    return "test" if is_heldout(prompt_id, test_fraction) else "train"


def prompt_id_of(kind: str, text: str) -> str:
    return stable_id("prompt", kind=kind, text=normalise_text(text))


def run(spark, cfg: IngestConfig) -> dict:
    lake = Lake(cfg.lake, mode="create")   # ingest may start a lake; a bad target fails before reading
    job_run_id = new_job_run_id()
    now = datetime.now(timezone.utc)
    prompts, quarantine, seen = [], [], set()
    for path, kind in cfg.files():
        # a SourceError (unreadable file, too many bad rows) stops the run before anything is written
        read = read_prompt_source(path, max_bad_fraction=cfg.max_bad_fraction, max_prompt_chars=cfg.max_prompt_chars)
        for rec in read.records:
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
                continue  # the same prompt twice: the first occurrence is the row of record
            seen.add(pid)
            prompts.append({
                "prompt_id": pid, "text": rec.text, "kind": rec_kind, "source": path, "source_row": rec.source_row,
                "source_format": read.format, "category": rec.category, "tags": list(rec.tags),
                "split": split_of(pid, cfg.test_fraction),
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
    summary = {"files": len(cfg.files()), "read": len(prompts), "inserted": inserted,
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
